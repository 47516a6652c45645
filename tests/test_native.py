"""The CPU kernels (byzjax/_native) against plain NumPy float64.

Shapes cover every register-tile remainder (n - 1 mod 3), column tails
(d mod 8), several column blocks and the multi-threaded split; Byzantine rows hold
NaN, +-Inf and 1e38. The distance kernels also read bfloat16 rows, checked against
the same oracle on the bfloat16 values widened exactly. The pure-XLA forms the
rules fall back to are tested on the same oracle in test_numerics.py and
test_aggregators.py (BYZJAX_NATIVE=0).
"""

import concurrent.futures
import ctypes
import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byzjax import _native
from byzjax import _numerics as nm

# Skipped only without a compiler: with one, a kernel that does not build fails here.
pytestmark = pytest.mark.skipif(
    _native._compiler() is None, reason="no C++ compiler: the kernels are not built"
)


def test_kernels_build_and_load():
    assert _native.enabled()


BAD = [np.nan, np.inf, -np.inf, 1e38]


# x of the distance kernels: float32, or bfloat16 read without a float32 copy.
X_DTYPES = pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"]
)


def _inputs(seed, n, d, bad=0, dtype=np.float32):
    # x rounded to `dtype` (bfloat16: 1e38 becomes 9.97e37); v stays float32.
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) + rng.normal(size=d)).astype(np.float32)
    for r in range(bad):
        x[r] = BAD[r % len(BAD)]
    return x[rng.permutation(n)].astype(dtype), rng.normal(size=d).astype(np.float32)


def _wide(x):
    """float64 of x's values, exactly (a bfloat16 widens to float32 exactly)."""
    return np.asarray(x, np.float32).astype(np.float64)


def _kernel_or_rule(rule, kernel, dtype):
    # float32 through the rule's routine (NaN -> +Inf there); bfloat16 through the
    # kernel itself, which `usable` does not offer it by default.
    if dtype == np.float32:
        return _jit(rule)

    def call(*args):
        out = np.asarray(_jit(kernel)(*args))
        assert out.dtype == np.float32
        return np.where(np.isnan(out), np.inf, out)

    return call


def _jit(fn):
    # A fresh function per call: jax caches traces per function object, and other
    # tests trace the same routines with the kernels switched off.
    return jax.jit(lambda *args: fn(*args))


def _want_pairwise(x):
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        want = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1).astype(np.float32)
    want = np.where(np.isnan(want), np.inf, want)
    np.fill_diagonal(want, 0.0)
    return want


@pytest.mark.parametrize(
    "n,d",
    [(1, 5), (2, 1), (3, 8), (4, 9), (5, 17), (7, 100), (13, 2053), (25, 30001)],
)
@pytest.mark.parametrize("bad", [0, 3])
@X_DTYPES
def test_pairwise_kernel_matches_numpy(n, d, bad, dtype):
    # (25, 30001): two threads, several 8,192-column blocks, a 1-column tail.
    x, _ = _inputs(n * d, n, d, min(bad, n - 1), dtype)
    pairwise = _kernel_or_rule(nm.pairwise_sq_dists, _native.pairwise_sq_dists, dtype)
    got = np.asarray(pairwise(x))
    np.testing.assert_allclose(got, _want_pairwise(_wide(x)), rtol=1e-5, atol=1e-5)
    assert np.array_equal(got, got.T)


@pytest.mark.parametrize(
    "n,d", [(1, 5), (3, 7), (14, 1000), (100, 20001), (21, 400_003)]
)
@pytest.mark.parametrize("bad", [0, 4])
@X_DTYPES
def test_row_kernel_matches_numpy(n, d, bad, dtype):
    # Rows four at a time, then the rest one by one (14, 21 rows); (21, 400003):
    # two threads, several 32,768-column blocks, a 3-column tail.
    x, v = _inputs(n + d, n, d, min(bad, n), dtype)
    rows = _kernel_or_rule(nm.row_sq_dists, _native.row_sq_dists, dtype)
    got = np.asarray(rows(x, v))
    with np.errstate(invalid="ignore", over="ignore"):
        want = ((_wide(x) - v) ** 2).sum(-1).astype(np.float32)
    want = np.where(np.isnan(want), np.inf, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The norms: the same sums without v.
    norms = _kernel_or_rule(nm.sq_norms, _native.row_sq_norms, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        want = (_wide(x) ** 2).sum(-1).astype(np.float32)
    want = np.where(np.isnan(want), np.inf, want)
    np.testing.assert_allclose(np.asarray(norms(x)), want, rtol=1e-5, atol=1e-5)


@X_DTYPES
def test_kernels_vmap_over_leading_axes(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 41)).astype(dtype)
    v = rng.normal(size=(2, 3, 41)).astype(np.float32)
    x64 = _wide(x)
    pw = jax.jit(jax.vmap(jax.vmap(_native.pairwise_sq_dists)))(x)
    rs = jax.jit(jax.vmap(jax.vmap(_native.row_sq_dists)))(x, v)
    sq = jax.jit(jax.vmap(jax.vmap(_native.row_sq_norms)))(x)
    assert pw.dtype == rs.dtype == sq.dtype == jnp.float32
    np.testing.assert_allclose(sq, (x64**2).sum(-1), rtol=1e-5)
    # An unbatched v is broadcast to the batch (vmap_method="broadcast_all").
    shared = jax.vmap(_native.row_sq_dists, in_axes=(0, None))
    rs_shared = jax.jit(shared)(x[0], v[0, 0])
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(pw[a, b], _want_pairwise(x64[a, b]), rtol=1e-5)
            want = ((x64[a, b] - v[a, b]) ** 2).sum(-1)
            np.testing.assert_allclose(rs[a, b], want, rtol=1e-5)
    for b in range(3):
        want = ((x64[0, b] - v[0, 0]) ** 2).sum(-1)
        np.testing.assert_allclose(rs_shared[b], want, rtol=1e-5)


def _want_moments(x64):
    # Two passes in float64: the mean, then the squared deviations from it.
    with np.errstate(invalid="ignore", over="ignore"):
        mu = x64.mean(0)
        return mu.astype(np.float32), ((x64 - mu) ** 2).sum(0).astype(np.float32)


@pytest.mark.parametrize(
    "n,d", [(1, 5), (3, 7), (4, 23), (13, 2053), (76, 3001), (20, 250_003)]
)
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "specials"])
@X_DTYPES
def test_moments_kernel_matches_numpy(n, d, bad, dtype):
    # (20, 250003): two threads, many column blocks, a 3-column tail; (4, 23) the
    # 16- and 8-wide paths and a 7-column tail. Columns sit near 1e3 with spread 1:
    # a one-pass sum of squares minus n mu^2 loses every digit of m2 there.
    rng = np.random.default_rng(n * d)
    x = (rng.normal(size=(n, d)) + 1e3 * (1.0 + rng.random(d))).astype(np.float32)
    if bad:  # at most one special per column: the sum of the others stays finite
        cols = rng.random(d) < 0.3
        x[rng.integers(0, n, cols.sum()), np.flatnonzero(cols)] = rng.choice(
            BAD, cols.sum()
        )
    x = x.astype(dtype)
    mu, m2 = _jit(_native.row_moments)(x)
    assert mu.dtype == m2.dtype == jnp.float32 and mu.shape == m2.shape == (d,)
    want_mu, want_m2 = _want_moments(_wide(x))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(m2, want_m2, rtol=2e-5, atol=1e-4, equal_nan=True)


def test_moments_kernel_vmaps_and_differentiates():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 6, 41)).astype(np.float32)
    mu, m2 = jax.jit(jax.vmap(jax.vmap(_native.row_moments)))(x)
    for a in range(2):
        for b in range(3):
            want_mu, want_m2 = _want_moments(x[a, b].astype(np.float64))
            np.testing.assert_allclose(mu[a, b], want_mu, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m2[a, b], want_m2, rtol=1e-5)
    # The JVP against a central difference of the float64 two-pass moments.
    x, t = x[0, 0], rng.normal(size=(6, 41)).astype(np.float32)
    _, (dmu, dm2) = jax.jit(lambda x, t: jax.jvp(_native.row_moments, (x,), (t,)))(x, t)
    h, x64 = 1e-6, x.astype(np.float64)

    def moments64(y):
        mu = y.mean(0)
        return mu, ((y - mu) ** 2).sum(0)

    up, down = moments64(x64 + h * t), moments64(x64 - h * t)
    np.testing.assert_allclose(dmu, (up[0] - down[0]) / (2 * h), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dm2, (up[1] - down[1]) / (2 * h), rtol=1e-4, atol=1e-4)


def test_kernel_beats_the_gram_matrix_on_cancellation():
    # Rows 1e3 apart on a common offset of 1e4 per coordinate: the uncentred Gram
    # matrix loses every digit in float32, differences do not.
    rng = np.random.default_rng(1)
    x = (1e4 + 1e-3 * rng.normal(size=(6, 4096))).astype(np.float32)
    got = np.asarray(_jit(nm.pairwise_sq_dists)(x))
    np.testing.assert_allclose(got, _want_pairwise(x), rtol=1e-4)


def test_switch_and_dtypes(monkeypatch):
    x = jnp.ones((3, 4), jnp.float32)
    assert _native.usable(x)
    assert not _native.usable(x.astype(jnp.bfloat16))
    assert _native.usable(x.astype(jnp.bfloat16), dtypes=(jnp.bfloat16,))
    monkeypatch.setenv("BYZJAX_NATIVE", "0")
    assert not _native.enabled() and not _native.usable(x)


def test_failed_build_raises_with_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("BYZJAX_CACHE_DIR", str(tmp_path))
    script = tmp_path / "cxx"
    script.write_text("#!/bin/sh\necho 'cc 1.0'\n[ \"$1\" = --version ] || exit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    with pytest.raises(subprocess.CalledProcessError):
        _native._build_shared("int x;", "kernels")
    # No half-written library or generated source is left (the lock file is).
    assert sorted(p.suffix for p in tmp_path.iterdir()) == ["", ".lock"]


def test_concurrent_builds_of_one_library_compile_it_once(tmp_path, monkeypatch):
    # Parallel test workers (or a sweep's processes) that need the same library
    # wait for one compilation; each then loads the same file.
    monkeypatch.setenv("BYZJAX_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "calls"
    script = tmp_path / "cxx"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] || {{ echo x >> {log}; sleep 1; }}\n'
        f'exec {shutil.which("c++") or shutil.which("g++")} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    source = 'extern "C" int eight() { return 8; }\n'
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(
            pool.map(
                lambda _: _native._build_shared(source, "test", ("-O1",)), range(3)
            )
        )
    assert len(set(paths)) == 1 and log.read_text() == "x\n"
    assert ctypes.cdll.LoadLibrary(str(paths[0])).eight() == 8


def test_a_library_built_in_parts_holds_every_part(tmp_path, monkeypatch):
    # The kernels compile as two objects at once, linked into one library; a part
    # that does not compile raises with the compiler's message.
    monkeypatch.setenv("BYZJAX_CACHE_DIR", str(tmp_path))
    source = (
        '#if BYZJAX_PART == 0\nextern "C" int two() { return 2; }\n'
        '#else\nextern "C" int three() { return 3; }\n#endif\n'
    )
    path = _native._build_shared(source, "test", ("-O1",), parts=2)
    lib = ctypes.cdll.LoadLibrary(str(path))
    assert lib.two() == 2 and lib.three() == 3
    broken = "#if BYZJAX_PART == 1\n#error part one is broken\n#endif\n"
    with pytest.raises(subprocess.CalledProcessError) as err:
        _native._build_shared(broken, "test", ("-O1",), parts=2)
    assert "part one is broken" in err.value.stderr
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".lock", ".so"]


def test_sources_include_their_precompiled_header(tmp_path, monkeypatch):
    # The network loops include one header, precompiled once per flags: a build
    # finds it by name, and without the precompiled form (deleted, or a compiler
    # that makes none) the text header is parsed instead.
    monkeypatch.setenv("BYZJAX_CACHE_DIR", str(tmp_path))
    header = ("byzjax_test.h", "#include <cstdint>\nconstexpr int64_t kSeven = 7;\n")
    source = '#include "byzjax_test.h"\nextern "C" int64_t seven() { return kSeven; }\n'
    lib = _native._build_shared(source, "test", ("-O1",), header)
    assert ctypes.cdll.LoadLibrary(str(lib)).seven() == 7
    (folder,) = tmp_path.glob("header-*")
    assert sorted(p.name for p in folder.iterdir()) == [header[0], header[0] + ".gch"]
    (folder / (header[0] + ".gch")).unlink()
    lib.unlink()
    assert (
        ctypes.cdll.LoadLibrary(
            str(_native._build_shared(source, "test", ("-O1",), header))
        ).seven()
        == 7
    )


def test_kernels_differentiate_like_their_formulas():
    # The simulator's influence weights take a VJP through the rules.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 19)).astype(np.float32)
    v = rng.normal(size=19).astype(np.float32)
    w = rng.normal(size=(5, 5)).astype(np.float32)

    def plain_pw(x):
        return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)

    def plain_rs(x, v):
        return ((x - v) ** 2).sum(-1)

    got = jax.grad(lambda x: (_native.pairwise_sq_dists(x) * w).sum())(x)
    want = jax.grad(lambda x: (plain_pw(x) * w).sum())(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    got = jax.grad(lambda x, v: (_native.row_sq_dists(x, v) * w[0]).sum(), (0, 1))
    want = jax.grad(lambda x, v: (plain_rs(x, v) * w[0]).sum(), (0, 1))
    for a, b in zip(got(x, v), want(x, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _want_mix(x, w, scale, sparse=False):
    # 0 * Inf and Inf - Inf are NaN, as in the kernel's float32 sums; sparse: a
    # row of weight 0 adds nothing.
    x = _wide(x)
    out = np.zeros((w.shape[0], x.shape[1]))
    with np.errstate(invalid="ignore", over="ignore"):
        for i, row in enumerate(w.astype(np.float64)):
            used = row != 0 if sparse else slice(None)
            out[i] = scale * (row[used] @ x[used])
    return out.astype(np.float32)


@pytest.mark.parametrize(
    "m,n,d",
    # Every output-row remainder of the 6-row (AVX-512) and 3-row (AVX2) tiles,
    # column tails of the 64- and 24-column chunks and one whole chunk, w wider or
    # narrower than tall, and two threads over 64-byte aligned rows (the
    # streaming stores, d = 4,000) or unaligned ones (d = 4,001).
    [(1, 1, 1), (1, 3, 7), (4, 4, 81), (7, 5, 100), (13, 13, 2053), (3, 9, 50)]
    + [(11, 8, 130), (12, 12, 64), (25, 25, 4000), (25, 25, 4001), (26, 26, 30011)],
)
@pytest.mark.parametrize("bad", [0, 3])
@X_DTYPES
def test_mix_kernel_matches_numpy(m, n, d, bad, dtype):
    # NNM's product: ones in w, the weight applied to the sums; sparse, as
    # bucketing's means, where Byzantine rows of NaN and +-Inf spoil only the
    # output rows that weigh them (1e38 rows overflow float32 sums, as XLA's
    # product does).
    rng = np.random.default_rng(m * n + d + bad)
    x = rng.normal(size=(n, d)).astype(np.float32)
    for r in range(min(bad, n)):
        x[rng.integers(n)] = BAD[r % 3]
    x = x.astype(dtype)
    # pairs: bfloat16 rows two a lane where w's entries are bfloat16 (`vdpbf16ps`,
    # where the kernels have it; float32 rows, a sparse mix or another w ignore it).
    cases = [
        (False, 0.7, False),
        (False, 0.7, True),
        (True, 0.7, True),
        (True, 0.1, False),
    ]
    for sparse, density, pairs in cases:
        w = (rng.random((m, n)) < density).astype(np.float32)
        if pairs:
            w *= rng.choice([1.0, -0.5, 3.0], size=w.shape).astype(np.float32)
        mix = _jit(
            lambda x, w, s=sparse, p=pairs: _native.mix_rows(x, w, 0.25, None, s, p)
        )
        got = np.asarray(mix(x, w))
        assert got.dtype == np.float32 and got.shape == (m, d)
        want = _want_mix(x, w, 0.25, sparse)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # General weights, the scale left at one.
    w = rng.normal(size=(m, n)).astype(np.float32)
    got = np.asarray(_jit(lambda x, w: _native.mix_rows(x, w, pairs=True))(x, w))
    np.testing.assert_allclose(got, _want_mix(x, w, 1.0), rtol=1e-5, atol=1e-4)
    # Cleaned rows (NNM's rows at a non-finite distance, and one finite row):
    # their non-finite entries count as zeros, the other rows' as they are.
    clean = ~np.isfinite(_wide(x)).all(axis=1)
    clean[0] = True
    cleaned = np.where(clean[:, None] & ~np.isfinite(_wide(x)), 0.0, _wide(x))
    w = (rng.random((m, n)) < 0.7).astype(np.float32)
    for pairs in (False, True):
        mix = _jit(
            lambda x, w, clean, p=pairs: _native.mix_rows(x, w, 0.5, clean, pairs=p)
        )
        got = np.asarray(mix(x, w, clean))
        np.testing.assert_allclose(
            got, _want_mix(cleaned, w, 0.5), rtol=1e-5, atol=1e-4
        )
        assert np.isfinite(got).all()


def test_mix_kernel_vmaps_and_differentiates():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 6, 41)).astype(np.float32)
    w = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    got = jax.jit(jax.vmap(jax.vmap(lambda x, w: _native.mix_rows(x, w, 0.5))))(x, w)
    np.testing.assert_allclose(got, 0.5 * (w @ x), rtol=1e-5, atol=1e-5)
    # bfloat16 rows and 0/1 weights (odd n, a whole chunk and a tail): w's pairs
    # made for each batch element.
    xb = jnp.asarray(rng.normal(size=(2, 3, 7, 100)), jnp.bfloat16)
    ones = (rng.random((2, 3, 7, 7)) < 0.7).astype(np.float32)
    mix = jax.vmap(jax.vmap(lambda x, w: _native.mix_rows(x, w, 0.5, pairs=True)))
    want = 0.5 * (ones @ np.asarray(xb, np.float32))
    np.testing.assert_allclose(jax.jit(mix)(xb, ones), want, rtol=1e-5, atol=1e-5)
    # Forward and reverse mode against the plain product; a non-finite entry of x
    # gives w no derivative.
    x, w = x[0, 0], w[0, 0]
    t, dw = rng.normal(size=x.shape), rng.normal(size=w.shape)
    t, dw = t.astype(np.float32), dw.astype(np.float32)
    out, dout = jax.jvp(lambda x, w: _native.mix_rows(x, w, 0.5), (x, w), (t, dw))
    np.testing.assert_allclose(dout, 0.5 * (dw @ x + w @ t), rtol=1e-5, atol=1e-5)
    cot = rng.normal(size=out.shape).astype(np.float32)
    gx, gw = jax.grad(lambda x, w: (_native.mix_rows(x, w, 0.5) * cot).sum(), (0, 1))(
        x, w
    )
    np.testing.assert_allclose(gx, 0.5 * w.T @ cot, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, 0.5 * cot @ x.T, rtol=1e-5, atol=1e-5)
    x[2, 5] = np.nan
    gw = jax.grad(lambda w: _native.mix_rows(x, w).sum())(w)
    assert np.isfinite(gw).all()
    # A cleaned row's non-finite entry has no derivative either.
    clean = np.arange(6) == 2
    gx = jax.grad(lambda x: _native.mix_rows(x, w, 1.0, clean).sum())(x)
    assert gx[2, 5] == 0 and np.isfinite(gx).all()
    np.testing.assert_allclose(gx[3], w[:, 3].sum(), rtol=1e-5)


def _want_gram(x64, c):
    y = x64 if c is None else x64 - c.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return y @ y.T, (x64**2).sum(-1)


@pytest.mark.parametrize(
    "n,d", [(1, 5), (2, 1), (4, 9), (7, 100), (13, 2053), (26, 30001), (25, 70003)]
)
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bad", [0, 3])
@X_DTYPES
def test_gram_kernel_matches_numpy(n, d, centred, bad, dtype):
    # (26, 30001): edge tiles of 2 and 1 rows, a 1-column tail; (25, 70003): two
    # threads, several 8,192-column blocks and 512-column runs, a 3-column tail.
    # The NaN / Inf / 1e38 rows flow into their own row and column only.
    x, c = _inputs(n * d + 3, n, d, min(bad, n - 1), dtype)
    x64 = _wide(x)
    c = c if centred else None
    g, q = _jit(_native.gram)(x, c)
    assert g.dtype == q.dtype == jnp.float32 and g.shape == (n, n) and q.shape == (n,)
    want_g, want_q = _want_gram(x64, c)
    ok = np.isfinite(x64).all(1) & (np.abs(x64) < 1e30).all(1)
    scale = np.abs(want_g[np.ix_(ok, ok)]).max(initial=1.0)
    np.testing.assert_allclose(
        np.asarray(g)[np.ix_(ok, ok)],
        want_g[np.ix_(ok, ok)],
        rtol=1e-5,
        atol=1e-6 * scale,
    )
    np.testing.assert_allclose(np.asarray(q)[ok], want_q[ok], rtol=1e-5)
    assert not np.isfinite(np.diagonal(np.asarray(g))[~ok]).any()
    assert not np.isfinite(np.asarray(q)[~ok]).any()
    assert np.array_equal(np.asarray(g), np.asarray(g).T, equal_nan=True)


def test_gram_kernel_error_within_its_bound():
    # Rows of one repeated value each, uncentred: every addition in a float32 lane
    # rounds alike, the worst case for long sums. The entries' errors stay under
    # gram_error |x_i| |x_j|, the bound the geometric median's Gram route relies
    # on (summed in float32 over whole blocks instead of 512-column runs, they
    # were 119 units of rounding against its 68).
    n, d = 9, 200_003
    x = np.repeat(370.37 * (1.0 + 0.01 * np.arange(n, dtype=np.float32)), d)
    x = x.reshape(n, d).astype(np.float32)
    g = np.asarray(_jit(_native.gram)(x)[0], np.float64)
    want, _ = _want_gram(x.astype(np.float64), None)
    size = np.sqrt(np.diagonal(want))
    # gram_error(0): the kernel's own part, without the caller's products.
    assert (np.abs(g - want) <= _native.gram_error(0) * np.outer(size, size)).all()


@X_DTYPES
def test_gram_kernel_vmaps_and_differentiates(dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 6, 41)).astype(dtype)
    c = rng.normal(size=(2, 3, 41)).astype(np.float32)
    g, q = jax.jit(jax.vmap(jax.vmap(_native.gram)))(x, c)
    g0, _ = jax.jit(jax.vmap(jax.vmap(_native.gram)))(x)
    for a in range(2):
        for b in range(3):
            want_g, want_q = _want_gram(_wide(x[a, b]), c[a, b])
            np.testing.assert_allclose(g[a, b], want_g, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(q[a, b], want_q, rtol=1e-5)
            np.testing.assert_allclose(
                g0[a, b], _want_gram(_wide(x[a, b]), None)[0], rtol=1e-5, atol=1e-5
            )
    xs = rng.normal(size=(5, 19)).astype(np.float32)
    cs = rng.normal(size=19).astype(np.float32)
    w, u = rng.normal(size=(5, 5)), rng.normal(size=5)

    def plain(x, c):
        y = x - c
        return y @ y.T, (x**2).sum(-1)

    def loss(gram):
        return lambda x, c: (gram(x, c)[0] * w).sum() + gram(x, c)[1] @ u

    got = jax.grad(loss(_native.gram), (0, 1))(xs, cs)
    want = jax.grad(loss(plain), (0, 1))(xs, cs)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    got = jax.grad(lambda x: (_native.gram(x)[0] * w).sum())(xs)
    want = jax.grad(lambda x: ((x @ x.T) * w).sum())(xs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _row_inputs(seed, n, d, dtype=jnp.bfloat16):
    # Normal values, exact zeros of both signs, and NaN / +-Inf / 1e37 entries,
    # rounded to `dtype` (the float64 oracle reads the same rounded values).
    # 1e37, not 1e38: n <= 34 of them cannot overflow the kernel's float32 sum.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[rng.random((n, d)) < 0.05] = 0.0
    x[rng.random((n, d)) < 0.02] = -0.0
    for value in (np.nan, np.inf, -np.inf, 1e37):
        x[rng.random((n, d)) < 0.01] = value
    xb = jnp.asarray(x, dtype)
    return xb, np.asarray(xb, np.float64)


def _want_rows(x64, mode):
    with np.errstate(invalid="ignore", over="ignore"):
        if mode == _native.MEAN:
            return x64.mean(-2)
        if mode == _native.SIGN_MAJORITY:
            return np.sign((x64 > 0).sum(-2) - (x64 < 0).sum(-2)).astype(np.float64)
        votes = (x64 >= 0).sum(-2) - (x64 < 0).sum(-2)
        return np.where(votes >= 0, 1.0, -1.0)


BF16_ULP = 2.0**-7  # the result is rounded to bfloat16 (8 significant bits)


@pytest.mark.parametrize(
    "n,d", [(1, 5), (2, 8), (3, 9), (7, 2049), (25, 4123), (4, 2_000_003)]
)
@pytest.mark.parametrize(
    "mode", [_native.MEAN, _native.SIGN_MAJORITY, _native.SIGN_MAJORITY_ZERO_UP]
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_row_rule_kernel_matches_numpy(n, d, mode, dtype):
    # (4, 2e6 + 3): two threads, several 16,384-column blocks, a column tail;
    # n = 7 and 25: passes of 8 rows (bfloat16's votes), 4 rows and single
    # rows; 4,123 columns: 128 steps of 32 (bfloat16's votes), one of 16, one
    # of 8 and a tail.
    xb, x64 = _row_inputs(n * 7 + d + mode, n, d, dtype)
    out = _jit(lambda x: _native.row_rule(x, mode))(xb)
    assert out.dtype == dtype and out.shape == (d,)
    got, want = np.asarray(out, np.float64), _want_rows(x64, mode)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    if mode != _native.MEAN:
        np.testing.assert_array_equal(got, want)
    elif dtype == jnp.bfloat16:
        np.testing.assert_allclose(got, want, rtol=BF16_ULP, atol=1e-30)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", [_native.SIGN_MAJORITY, _native.SIGN_MAJORITY_ZERO_UP])
def test_row_rule_votes_every_bfloat16_bit_pattern(mode):
    # Each of the 65,536 bfloat16 patterns in a column of its own, beside four
    # rows of +1 and four of -1 whose votes cancel: the column's sign is the
    # pattern's own vote (0 for NaN of either sign), so a pattern at the ends of
    # a range (0x0001, +-Inf, the first NaN of each sign, -0) voted wrongly
    # flips its column. Mode 2 maps no votes to +1, so a fifth row of -1 there
    # tells an up vote (-0's, +0's) from none.
    patterns = np.arange(2**16, dtype=np.uint32) << 16
    x = np.ones((9 if mode == _native.SIGN_MAJORITY else 10, 2**16), np.float32)
    x[0] = patterns.view(np.float32)
    x[5:] = -1.0
    with np.errstate(invalid="ignore"):  # the signalling NaN patterns' casts
        xb, x64 = jnp.asarray(x, jnp.bfloat16), x.astype(np.float64)
    got = np.asarray(_jit(lambda x: _native.row_rule(x, mode))(xb), np.float64)
    np.testing.assert_array_equal(got, _want_rows(x64, mode))


def test_row_rule_rounds_bfloat16_to_nearest_even_like_xla():
    # Sums of two rows land between bfloat16 neighbours and on exact ties.
    rng = np.random.default_rng(5)
    xb = jnp.asarray(rng.normal(size=(2, 4099)), jnp.bfloat16)
    got = _jit(lambda x: _native.row_rule(x, _native.MEAN))(xb)
    want = jnp.mean(xb.astype(jnp.float32), axis=0).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_row_rule_vmap_and_derivative():
    xb, x64 = _row_inputs(3, 4 * 5, 37)
    batch = xb.reshape(4, 5, 37)
    for mode in (_native.MEAN, _native.SIGN_MAJORITY):
        got = jax.vmap(lambda x, m=mode: _native.row_rule(x, m))(batch)
        want = _want_rows(x64.reshape(4, 5, 37), mode)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=BF16_ULP)
    t = jnp.asarray(np.random.default_rng(4).normal(size=(5, 37)), jnp.bfloat16)
    finite = jnp.where(jnp.isfinite(batch[0]), batch[0], 0).astype(jnp.bfloat16)
    _, tangent = jax.jvp(lambda x: _native.row_rule(x, _native.MEAN), (finite,), (t,))
    want = np.asarray(t, np.float64).mean(0)
    np.testing.assert_allclose(np.asarray(tangent, np.float64), want, rtol=BF16_ULP)
    _, tangent = jax.jvp(
        lambda x: _native.row_rule(x, _native.SIGN_MAJORITY), (finite,), (t,)
    )
    assert not np.asarray(tangent, np.float64).any()


def _want_step(x, z, w):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    on = w64 != 0
    moved = z * (1.0 - w64.sum()) + w64[on] @ x64[on]
    with np.errstate(invalid="ignore", over="ignore"):
        sq = ((x64 - moved) ** 2).sum(-1)
    return moved, sq


@pytest.mark.parametrize(
    "n,d", [(1, 5), (3, 7), (6, 9), (12, 1000), (100, 20001), (20, 400_003)]
)
@pytest.mark.parametrize("bad", [0, 4])
@X_DTYPES
def test_step_kernel_matches_numpy(n, d, bad, dtype):
    # (100, 20001): several column blocks, passes of 7 and 8 rows, a 1-column tail;
    # (20, 400003): two threads. The weights of the NaN / Inf / 1e38 rows are 0
    # (the rules' usage), one more finite row gets weight 0 and the weights need
    # not sum to 1. z and w are float32 for a bfloat16 x too.
    x, z = _inputs(n * d + 1, n, d, min(bad, n), dtype)
    x64 = _wide(x)
    rng = np.random.default_rng(n + d)
    w = rng.uniform(0.0, 2.0 / n, size=n).astype(np.float32)
    w[~np.isfinite(x64).all(1) | (np.abs(x64) > 1e30).any(1)] = 0.0
    w[n // 2] = 0.0
    want_z, want_sq = _want_step(x64, z, w)
    got_z, got_sq = _jit(_native.step_sq_dists)(x, z, w)
    assert got_z.dtype == got_sq.dtype == jnp.float32
    np.testing.assert_allclose(got_z, want_z, rtol=1e-5, atol=1e-5)
    finite = np.isfinite(want_sq) & (want_sq < 1e38)
    np.testing.assert_allclose(np.asarray(got_sq)[finite], want_sq[finite], rtol=1e-5)
    assert not np.isfinite(np.asarray(got_sq)[~finite]).any()
    no_dist = _jit(lambda x, z, w: _native.step_sq_dists(x, z, w, False))(x, z, w)
    np.testing.assert_array_equal(no_dist[0], got_z)
    assert not np.asarray(no_dist[1]).any()


@X_DTYPES
def test_step_kernel_zero_weights_keep_z_and_vmap(dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 33)).astype(dtype)
    z = rng.normal(size=(2, 33)).astype(np.float32)
    w = rng.uniform(size=(2, 5)).astype(np.float32)
    w[1] = 0.0
    got_z, got_sq = jax.jit(jax.vmap(_native.step_sq_dists))(x, z, w)
    for b in range(2):
        want_z, want_sq = _want_step(_wide(x[b]), z[b], w[b])
        np.testing.assert_allclose(got_z[b], want_z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_sq[b], want_sq, rtol=1e-5)
    np.testing.assert_array_equal(got_z[1], z[1])


@X_DTYPES
def test_step_kernel_passes_of_every_width_and_the_empty_centre(dtype):
    # m = 0 to 16 rows of nonzero weight: every pass width (1 to 8 rows) and
    # every way of sharing m between passes; an empty z stands for zeros (the
    # rules' weighted sums), also under vmap.
    rng = np.random.default_rng(11)
    n, d = 18, 37
    x, z = _inputs(12, n, d, 2, dtype)
    x64 = _wide(x)
    finite = np.flatnonzero(np.isfinite(x64).all(1) & (np.abs(x64) < 1e30).all(1))
    empty = jnp.zeros((0,), jnp.float32)
    step = jax.jit(_native.step_sq_dists)
    summed = jax.jit(lambda x, w: _native.step_sq_dists(x, empty, w, False))
    ws = []
    for m in range(len(finite) + 1):
        w = np.zeros(n, np.float32)
        w[rng.permutation(finite)[:m]] = rng.uniform(-1.0, 1.0, m)
        ws.append(w)
        want_z, want_sq = _want_step(x64, z, w)
        got_z, got_sq = step(x, z, w)
        np.testing.assert_allclose(got_z, want_z, rtol=1e-5, atol=1e-5)
        ok = np.isfinite(want_sq) & (want_sq < 1e38)
        np.testing.assert_allclose(np.asarray(got_sq)[ok], want_sq[ok], rtol=1e-5)
        got_sum, no_sq = summed(x, w)
        assert got_sum.shape == (d,) and not np.asarray(no_sq).any()
        want_sum = _want_step(x64, np.zeros(d), w)[0]
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)
    batched = jax.jit(jax.vmap(summed, in_axes=(None, 0)))(x, np.stack(ws))[0]
    for got, w in zip(np.asarray(batched), ws, strict=True):
        want = _want_step(x64, np.zeros(d), w)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_step_kernel_with_the_empty_centre_differentiates_as_with_zeros():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 19)).astype(np.float32)
    w = rng.uniform(size=7).astype(np.float32)
    w[3] = 0.0
    cz, cs = rng.normal(size=19), rng.normal(size=7)

    def loss(z):
        def f(x, w):
            moved, sq = _native.step_sq_dists(x, z, w)
            return moved @ cz + sq @ cs

        return f

    got = jax.grad(loss(jnp.zeros((0,), jnp.float32)), (0, 1))(x, w)
    want = jax.grad(loss(jnp.zeros(19, jnp.float32)), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_step_kernel_differentiates_like_its_formula():
    # Rows of weight 0 are left out of the sum, derivatives included (a NaN row
    # must not leak into them).
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 21)).astype(np.float32)
    z = rng.normal(size=21).astype(np.float32)
    w = rng.uniform(size=6).astype(np.float32)
    w[2] = 0.0
    cz, cs = rng.normal(size=21), rng.normal(size=6)
    on = (w != 0)[:, None]

    def plain(x, z, w):
        moved = z * (1.0 - w.sum()) + w @ jnp.where(on, x, 0.0)
        return moved, ((x - moved) ** 2).sum(-1)

    def loss(step):
        return lambda x, z, w: (step(x, z, w)[0] @ cz) + (step(x, z, w)[1] @ cs)

    got = jax.grad(loss(_native.step_sq_dists), (0, 1, 2))(x, z, w)
    want = jax.grad(loss(plain), (0, 1, 2))(x, z, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    x[2] = np.nan  # its own distance is NaN; z' and its derivatives are not
    got = jax.grad(lambda *a: _native.step_sq_dists(*a)[0] @ cz, (0, 1, 2))(x, z, w)
    assert bool(jnp.all(jnp.isfinite(got[1]))) and bool(jnp.all(jnp.isfinite(got[2])))


def _bf16_operands(seed, n, d):
    # A bfloat16 x and tangent t; float32 (v, s), (z, dz) and (w, dw), w[2] = 0.
    rng = np.random.default_rng(seed)
    xb, tb = (jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16) for _ in range(2))
    f32 = [rng.normal(size=d).astype(np.float32) for _ in range(4)]
    w = rng.uniform(size=n).astype(np.float32)
    w[2] = 0.0
    return xb, tb, f32, w, rng.normal(size=n).astype(np.float32)


def test_bfloat16_kernels_differentiate_like_float32_on_the_widened_input():
    xb, tb, (v, s, z, dz), w, dw = _bf16_operands(7, 6, 21)
    x32, t32 = xb.astype(jnp.float32), tb.astype(jnp.float32)
    cases = [
        (_native.pairwise_sq_dists, (), ()),
        (_native.row_sq_dists, (v,), (s,)),
        (_native.row_sq_norms, (), ()),
        (_native.row_moments, (), ()),
        (_native.step_sq_dists, (z, w), (dz, dw)),
        (lambda x, z, w: _native.step_sq_dists(x, z, w, False), (z, w), (dz, dw)),
    ]
    for fn, rest, drest in cases:

        def jvp(x, t, f=fn, r=rest, dr=drest):
            return jax.jvp(f, (x, *r), (t, *dr))

        want = jvp(x32, t32)
        got_leaves, want_leaves = (
            jax.tree.leaves(jax.jit(jvp)(xb, tb)),
            jax.tree.leaves(want),
        )
        assert len(got_leaves) == len(want_leaves) > 0
        for a, b in zip(got_leaves, want_leaves, strict=True):
            assert a.dtype == b.dtype == jnp.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        # Reverse mode (the simulator's influence weights): a bfloat16 gradient,
        # the float32 one rounded.
        outs = jax.tree.leaves(want[0])
        cot = [np.random.default_rng(8).normal(size=o.shape) for o in outs]

        def loss(x, f=fn, r=rest, cot=cot):
            outs = jax.tree.leaves(f(x, *r))
            return sum((o * c).sum() for o, c in zip(outs, cot, strict=True))

        gb, g32 = jax.grad(loss)(xb), jax.grad(loss)(x32)
        assert gb.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(gb, np.float64), g32, rtol=BF16_ULP, atol=1e-3
        )


def test_distance_kernels_want_float32_operands_besides_x():
    xb, _, (v, _, z, _), w, _ = _bf16_operands(9, 6, 21)
    with pytest.raises(TypeError, match="v must be float32"):
        _native.row_sq_dists(xb, v.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="z must be float32"):
        _native.step_sq_dists(xb, z.astype(jnp.bfloat16), w)
    with pytest.raises(TypeError, match="w must be float32"):
        _native.step_sq_dists(xb, z, w.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="x must be float32 or bfloat16"):
        _native.pairwise_sq_dists(xb.astype(jnp.float16))
    with pytest.raises(TypeError, match="w must be float32"):
        _native.mix_rows(xb, jnp.ones((2, 6), jnp.bfloat16))


def test_bfloat16_kernels_make_no_float32_copy():
    # The point of reading bfloat16 rows: XLA would otherwise write a float32 x,
    # twice the input. The same measure sees that copy when one is made.
    n, d = 25, 100_000
    x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    size = n * d * 2

    def temp_bytes(fn):
        return jax.jit(fn).lower(x).compile().memory_analysis().temp_size_in_bytes

    calls = {
        "pairwise": _native.pairwise_sq_dists,
        "row": lambda x: _native.row_sq_dists(x, jnp.zeros(d, jnp.float32)),
        "norms": _native.row_sq_norms,
        "moments": _native.row_moments,
        "step": lambda x: _native.step_sq_dists(
            x, jnp.zeros(d, jnp.float32), jnp.full(n, 1.0 / n, jnp.float32)
        ),
        "gram": lambda x: _native.gram(x, jnp.zeros(d, jnp.float32)),
        "mix": lambda x: _native.mix_rows(x, jnp.ones((n, n), jnp.float32)),
    }
    for name, fn in calls.items():
        assert temp_bytes(fn) < size, name
        assert temp_bytes(lambda x, f=fn: f(x.astype(jnp.float32))) >= 2 * size, name


def _network_inputs(seed, n, d, dtype):
    """Columns with NaN of either sign, +-Inf, 1e38, signed zeros, ties (small
    integers), a non-finite median and zeros alone."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, : d // 3] = rng.integers(-2, 3, size=(n, d // 3))
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e38, 0.0, -0.0], np.float32)
    hit = rng.random((n, d)) < 0.08
    x[hit] = rng.choice(special, size=hit.sum())
    # Half the rows -Inf, half +Inf: for even n the median is NaN.
    x[:, -1] = np.where(np.arange(n) < n // 2, -np.inf, np.inf)
    if d >= 6:  # zeros alone, of either sign: which signs the sums keep
        x[:, -3] = np.where(rng.random(n) < 0.5, 0.0, -0.0)
        x[:, -2] = np.where(rng.random(n) < 0.1, 0.0, -0.0)
    return jnp.asarray(x).astype(dtype)


def _bits(a):
    # Every NaN as one pattern: which operand's NaN an addition keeps is the
    # compiler's choice (LLVM and GCC may commute it).
    a = np.asarray(a, np.float32)
    return np.where(np.isnan(a), np.float32(np.nan), a).view(np.uint32)


def _loop_window(k):
    """The XLA form whose bits the window loop has: the float32 rule's on the
    rows widened to float32 (as the loop loads them) up to 32 rows; above, the
    window's mean, its NaN columns the general form's (the rule's own form
    there: `networks.window_mean_source`)."""

    def form(x):
        x = x.astype(jnp.float32)
        if x.shape[0] <= 32:
            return nm.coordinate_mean_around_median(x, k)
        window = nm._window_mean(x, k)
        return jnp.where(jnp.isnan(window), nm._mean_around_own_median(x, k), window)

    return form


def _loop_trimmed_mean(b):
    """The XLA form whose bits the trimmed mean's loop has: the partition
    network's middle ranks (the rule's own form up to 32 rows; above, the rule
    clips the rows: `networks.trimmed_mean_source`)."""
    return functools.partial(nm._middle_mean, b=b)


# Odd and even n up to 32; fewer columns than a step (3, 1), one step of 8 (7, 8),
# column tails; (25, 80011) on the loop's two threads (4 n d >= 8e6 elements'
# work, `thread_count`), 40,008 columns and 40,003, a tail in each at 16 a step.
NETWORK_SHAPES = [(2, 9), (3, 1), (7, 8), (8, 37), (25, 80011), (31, 40), (32, 17)]
# Shapes on which the loops of the width this CPU does not prefer run too: odd and
# even n, a column tail, the threaded split, n = 32.
NETWORK_OTHER_WIDTH = [(3, 1), (8, 37), (25, 80011), (32, 17)]


def _widths_here():
    # AVX2's 8 columns a step run on every CPU the loops build for; AVX-512's 16
    # only where the CPU has it (the suite's machines have had either).
    from byzjax._native import networks

    return sorted({8, networks.native_width()})


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("n,d", NETWORK_SHAPES)
@X_DTYPES
def test_network_loops_give_the_xla_forms_bits(n, d, dtype, width):
    # The generated loops run the XLA forms' compare-exchanges and arithmetic in
    # the same order: the same bits, signed zeros and NaN included, column tails
    # (d mod width) and the threaded split too.
    from byzjax._native import networks

    if width not in _widths_here():
        pytest.skip(f"this CPU has no {width}-lane loops (AVX-512)")
    if width != networks.native_width() and (n, d) not in NETWORK_OTHER_WIDTH:
        # The other width's loops come from the same generator: a few shapes keep
        # the suite's time (each loop compiles in about 0.6 s).
        pytest.skip("the other width runs on a few shapes")
    x = _network_inputs(n * 1000 + d, n, d, dtype)
    # bfloat16's loops on column pairs: their own test below.
    median = networks.median_source(n, dtype, width=width, paired=False)
    cases = {"median": (median, nm.coordinate_median)}
    for b in sorted({1, (n - 1) // 2}):
        if n - 2 * b >= 1:
            cases[f"trimmed {b}"] = (
                networks.trimmed_mean_source(n, b, dtype, width=width, paired=False),
                lambda x, b=b: nm.coordinate_trimmed_mean(x, b),
            )
    if dtype == np.float32:
        for k in sorted({(n + 1) // 2, n - 1, n}):
            # The window, its NaN columns settled (`_fix_columns`).
            cases[f"window {k}"] = (
                networks.window_mean_source(n, k, width=width),
                functools.partial(nm.coordinate_mean_around_median, k=k),
            )
    for name, (source, xla_form) in cases.items():
        got = _jit(lambda x, s=source: networks.network_rule(x, s))(x)
        want = _jit(xla_form)(x)
        assert got.dtype == want.dtype == jnp.float32, name
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)


@pytest.mark.parametrize(
    "n,d,b,dtype",
    [
        (34, 37, 1, np.float32),
        # Two threads on two cores (`NETWORK_SHAPES`): 20,104 columns and 20,099.
        (99, 40203, 24, np.float32),
        (128, 17, 63, np.float32),
        # bfloat16's loops differ in their loads and exchanges alone: two shapes
        # (its XLA forms take seconds more to compile), with column blocks and a
        # tail; the threaded split is the same code as float32's.
        (34, 37, 1, jnp.bfloat16),
        (65, 555, 16, jnp.bfloat16),
    ],
)
def test_selection_loops_above_32_rows_give_the_xla_bits(n, d, b, dtype):
    # The median, trimmed mean and mean around the median run as loops up to 128
    # rows (bfloat16 networks by XLA's min/max there: AVX-512's range
    # instruction, or integer min and max on order keys: with AVX2, and on AMD's
    # AVX-512, where float32's networks take the keys too). Column blocks of
    # 256 (65 and 99 rows), a part block, a tail, the threaded split (99 rows).
    x = _network_inputs(n * 1000 + d, n, d, dtype)
    # One trimming each (each loop and XLA form takes seconds to compile): the
    # fewest, a quarter, the most.
    # Each rule and the XLA form whose bits its loop has.
    rules = {
        "median": (nm.coordinate_median, nm.coordinate_median),
        "trimmed mean": (
            functools.partial(nm.coordinate_trimmed_mean, b=b),
            _loop_trimmed_mean(b),
        ),
    }
    if n in (34, 65):  # XLA's form took 3.2 s to compile at (99, k = 75), 1.7 s
        # at 65 rows in bfloat16. k = n - b ties at the top (two non-finite rows)
        # in most columns, so the window loops settle them in worker order.
        for k in (n - b, 18) if n == 34 else (n - b,):
            rule = functools.partial(nm.coordinate_mean_around_median, k=k)
            rules[f"mean around the median, k = {k}"] = (rule, _loop_window(k))
    for name, (rule, xla_form) in rules.items():
        fn = _jit(functools.partial(rule, stored=True))
        assert "byzjax_network" in jax.jit(fn).lower(x).as_text(), name
        want = _bits(_jit(xla_form)(x))
        np.testing.assert_array_equal(_bits(fn(x)), want, err_msg=name)


@pytest.mark.parametrize("n", [25, 34])
@pytest.mark.parametrize("width", [8, 16])
@X_DTYPES
def test_loops_on_order_keys_give_the_xla_bits(dtype, width, n):
    # The loops may run their networks on integer order keys (`keyed_exchanges`:
    # AMD Zen 4), which put -0 below +0 where XLA's selects keep equal zeros in
    # place: the steps with a zero among the ranks used run again by float
    # exchanges where the column holds a -0. Both forms, on every CPU: columns of
    # zeros of both signs or of one (zero medians and trimming ends), and the
    # special values of `_network_inputs`.
    from byzjax._native import networks

    if width not in _widths_here():
        pytest.skip(f"this CPU has no {width}-lane loops (AVX-512)")
    d, b, k = 999, n // 4, n - 14
    x = np.array(_network_inputs(7, n, d, np.float32))
    rng = np.random.default_rng(8)
    x[:, :300] = rng.choice(np.float32([0.0, -0.0]), size=(n, 300))
    # Zeros at the top end of the trimming only, then at its bottom end only.
    x[:, 300:400] = rng.choice(np.float32([0.0, -0.0, -1.0, -1.0]), size=(n, 100))
    x[:, 400:500] = rng.choice(np.float32([0.0, -0.0, 1.0, 1.0]), size=(n, 100))
    # Zeros of one sign alone: the keys' zeros stand (no -0), or are remade.
    x[:, 500:540] = 0.0
    x[:, 540:580] = -0.0
    x = jnp.asarray(x).astype(dtype)
    cases = {
        "median": (
            functools.partial(networks.median_source, paired=False),
            nm.coordinate_median,
        ),
        "trimmed mean": (
            functools.partial(networks.trimmed_mean_source, b=b, paired=False),
            _loop_trimmed_mean(b),
        ),
        # The general form (float32 takes the window where 2k >= n).
        "mean around the median": (
            functools.partial(networks.mean_around_median_source, k=k, paired=False),
            functools.partial(nm._mean_around_own_median, k=k),
        ),
    }
    if dtype == np.float32:
        window = max(k, (n + 1) // 2)  # 2k >= n
        cases["window"] = (
            functools.partial(networks.window_mean_source, k=window),
            _loop_window(window),
        )
    if n <= 32:
        # Below 33 rows only the median and the window take the keys
        # (`keyed_exchanges`).
        cases = {name: cases[name] for name in ("median", "window") if name in cases}
    for name, (source, rule) in cases.items():
        want = _bits(_jit(rule)(x))
        for keyed in (False, True):
            s = source(n=n, dtype=dtype, width=width, keyed=keyed)
            got = _jit(lambda x, s=s: networks.network_rule(x, s))(x)
            np.testing.assert_array_equal(_bits(got), want, err_msg=f"{name} {keyed}")


@pytest.mark.parametrize("n,d", [(25, 1037), (65, 555)])
@X_DTYPES
def test_loops_streamed_or_blocked_give_the_same_bits(n, d, dtype):
    # How a loop brings its rows in (`streamed_loops`: each row into L2 as it
    # goes; else column blocks or each row into L1) is this CPU's choice; the
    # other form is built here too. 1,037 columns: whole blocks of 256 (512
    # bfloat16), a part block and a tail. The default forms are checked against
    # XLA's bits above; the other must match them.
    from byzjax._native import networks

    x = _network_inputs(n * 1000 + d, n, d, dtype)
    b, k = n // 4, n - n // 4
    sources = {
        "median": functools.partial(networks.median_source, n, dtype),
        "trimmed mean": functools.partial(networks.trimmed_mean_source, n, b, dtype),
        "mean around the median": functools.partial(
            networks.mean_around_median_source, n, k, dtype
        ),
    }
    if dtype == np.float32:
        sources["window"] = functools.partial(networks.window_mean_source, n, k)
    for name, source in sources.items():
        loops = [source(streamed=on) for on in (False, True)]
        bits = [
            _bits(_jit(lambda x, s=s: networks.network_rule(x, s))(x)) for s in loops
        ]
        np.testing.assert_array_equal(bits[0], bits[1], err_msg=name)


@pytest.mark.parametrize("n", [33, 65, 100])
@pytest.mark.parametrize(
    "dtype,width,paired",
    [(jnp.float32, 16, False), (jnp.float32, 8, False), (jnp.bfloat16, 16, False)]
    + [(jnp.bfloat16, 16, True), (jnp.bfloat16, 8, True)],
)
def test_blocked_loops_prefetch_every_line_of_the_next_block(n, dtype, width, paired):
    # A blocked loop's steps prefetch the next column block into L2, their
    # share of its lines each, beside the rows' first loads (`_Loop._share`):
    # over a block's steps every line of every row, each row index in range
    # (the pointer load would read past `rows` otherwise). The slots g + j of
    # the source, evaluated as the loop runs them, step by step.
    import re

    from byzjax._native import networks

    source = networks.median_source(
        n, dtype, width=width, paired=paired, streamed=False
    )
    lines = networks._BLOCK_LINES
    steps = networks._BLOCK_BYTES // (jnp.dtype(dtype).itemsize * width)
    steps //= 2 if paired else 1  # a pair loop's step is twice the width
    share = int(re.search(r"g \+= (\d+)\)", source).group(1))
    prefetches = [line for line in source.splitlines() if "_MM_HINT_T1" in line]
    slots = [int(re.search(r"rows\[\(+g \+ (\d+)", p).group(1)) for p in prefetches]
    assert slots == list(range(share))
    clamped = "kLines * kRows - 1" in prefetches[0]
    seen = []
    for step in range(steps):
        for j in range(share):
            line = step * share + j
            seen.append(min(line, lines * n - 1) if clamped else line)
    assert max(seen) < lines * n and set(seen) == set(range(lines * n))


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("n,d", [*NETWORK_SHAPES, (34, 37), (65, 555)])
def test_bfloat16_loops_on_column_pairs_give_the_xla_bits(n, d, width):
    # bfloat16's median, trimmed mean and mean around the median (its window and
    # its general form) take two columns in each lane of the float loops, on
    # 16-bit order keys
    # (`_PairLoop`: 16 columns a step with AVX2, 32 with AVX-512BW), then their
    # arithmetic on each half: the shapes of the other loops, blocked ones above
    # 32 rows (XLA's min/max there, as the keys order zeros), and columns of
    # zeros of both signs or one, where below 33 rows a step with a zero rank
    # used in a column holding a -0 runs again by XLA's selects; NaN of either
    # sign.
    from byzjax._native import networks

    if width not in _widths_here():
        pytest.skip(f"this CPU has no {width}-lane loops (AVX-512)")
    if width == 16 and not networks.pair_loops(jnp.bfloat16, "median", n):
        pytest.skip("this CPU has no 32-lane bfloat16 loops (AVX-512BW)")
    x = np.array(_network_inputs(n * 1000 + d, n, d, np.float32))
    if d >= 100:
        rng = np.random.default_rng(n)
        x[:, 10:40] = rng.choice(np.float32([0.0, -0.0]), size=(n, 30))
        x[:, 40:70] = rng.choice(np.float32([0.0, -0.0, 1.0, -1.0]), size=(n, 30))
        x[:, 70:80] = -0.0
        # NaN of both signs, as +Inf to the rules: many of them, so the median
        # is one in some columns.
        nans = np.float32([np.nan, -np.nan, 1.0, -np.inf])
        x[:, 80:110] = rng.choice(nans, size=(n, 30), p=[0.3, 0.3, 0.2, 0.2])
    x = jnp.asarray(x).astype(jnp.bfloat16)
    cases = {"median": (networks.median_source, nm.coordinate_median)}
    for b in sorted({1, (n - 1) // 2}):
        if n - 2 * b >= 1:
            cases[f"trimmed {b}"] = (
                functools.partial(networks.trimmed_mean_source, b=b),
                _loop_trimmed_mean(b),
            )
    for k in sorted({(n + 1) // 2, n}):
        cases[f"mean around the median {k}"] = (
            functools.partial(networks.mean_around_median_source, k=k),
            functools.partial(nm.coordinate_mean_around_median, k=k),
        )
    for k in sorted({(n + 1) // 2, n - 1, n} - {0}):
        # Below 33 rows the window's zero means are checked, not every wire.
        cases[f"window {k}"] = (
            functools.partial(networks.window_mean_source, k=k),
            _loop_window(k),
        )
    for name, (make, xla_form) in cases.items():
        source = make(n=n, dtype=jnp.bfloat16, width=width, paired=True)
        assert f"kWidth = {2 * width};" in source
        got = _jit(lambda x, s=source: networks.network_rule(x, s))(x)
        want = _jit(xla_form)(x)
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)


@pytest.mark.parametrize(
    "n,d,k,dtype",
    [
        (3, 40, 1, jnp.bfloat16),  # all columns of -0 alone: XLA's sum is -0
        (8, 37, 3, jnp.bfloat16),
        (25, 1001, 12, jnp.bfloat16),
        (8, 37, 3, np.float32),
    ],
)
def test_mean_around_median_loop_without_a_window_gives_the_xla_bits(n, d, k, dtype):
    # Where the window form does not apply (2k < n) the rule runs its general
    # form as one loop up to 32 rows too, with the bits of XLA's row form.
    x = _network_inputs(n * 1000 + d, n, d, dtype)
    fn = _jit(lambda x: nm.coordinate_mean_around_median(x, k, stored=True))
    assert "byzjax_network" in jax.jit(fn).lower(x).as_text()
    want = _jit(lambda x: nm.coordinate_mean_around_median(x, k))(x)
    np.testing.assert_array_equal(_bits(fn(x)), _bits(want))


def test_mean_around_median_window_loop_settles_ties_as_xla_does():
    # Float32 up to 32 rows: the window loop settles a step's two-sided ties
    # (SPEC T0) itself, column by column; XLA's window leaves them NaN for the
    # fix, which recomputes gathered blocks (a few such columns) or the whole
    # array (a third of the columns small integers), and keeps every other
    # column's bits: the same bits either way.
    n, d, k = 25, 9 * 1024 + 5, 19
    rng = np.random.default_rng(25)
    few = rng.normal(size=(n, d)).astype(np.float32)
    for j in (0, 3 * 1024 + 17, d - 1):
        # Median 0, six of the twelve entries at distance 1 taken: T0 takes the
        # lower workers', the sorted window the -1 first.
        few[:, j] = rng.permutation([0.0] * 13 + [1.0] * 6 + [-1.0] * 6)
    fn = _jit(lambda x: nm.coordinate_mean_around_median(x, k, stored=True))
    assert "byzjax_network" in jax.jit(fn).lower(few).as_text()
    xla = _jit(lambda x: nm.coordinate_mean_around_median(x, k))
    for name, x in {"few": few, "many": _network_inputs(7, n, d, np.float32)}.items():
        np.testing.assert_array_equal(_bits(fn(x)), _bits(xla(x)), err_msg=name)
        # bfloat16 rows take the window loop too, widened as they load: the
        # float32 rule's bits on the widened rows.
        narrow = jnp.asarray(x, jnp.bfloat16)
        want = _bits(xla(narrow.astype(jnp.float32)))
        np.testing.assert_array_equal(_bits(fn(narrow)), want, err_msg=name)


def test_mean_around_median_loop_keeps_the_signs_of_zero_totals():
    # Columns whose 3 entries nearest the median are zeros of either sign or
    # normals whose sums flush to zero, the others far from them (no tie at
    # delta: the loop's fast branch, all 16 columns of every step), in random
    # worker order: totals of zero, where the masked adds keep a -0 that XLA's
    # added +0 makes +0.
    d, k = 4000, 3
    rng = np.random.default_rng(3)
    near = rng.choice(np.float32([-0.0, 0.0, 1.5e-38, -1.6e-38]), size=(3, d))
    far = np.repeat(np.float32([[-50.0], [-1.0], [1.0], [7.0], [50.0]]), d, axis=1)
    x = rng.permuted(np.concatenate([near, far]), axis=0)
    fn = _jit(lambda x: nm.coordinate_mean_around_median(x, k, stored=True))
    assert "byzjax_network" in jax.jit(fn).lower(x).as_text()
    want = _bits(_jit(lambda x: nm.coordinate_mean_around_median(x, k))(x))
    assert (want == _bits(np.float32(0.0))).sum() > 100
    np.testing.assert_array_equal(_bits(fn(x)), want)


@pytest.mark.parametrize(
    "n,m,d,k,dtype",
    [
        (25, 15, 1001, 5, np.float32),
        (25, 15, 1001, 5, jnp.bfloat16),
        (9, 5, 37, 3, np.float32),
    ],
)
def test_mean_around_median_of_chosen_rows_gives_the_xla_bits(n, m, d, k, dtype):
    # Bulyan's coordinate stage: the loop reads the rows x[idx] where they lie (no
    # gathered copy), with the bits of XLA's general form on the gathered rows.
    x = _network_inputs(n * 1000 + d + k, n, d, dtype)
    idx = np.sort(np.random.default_rng(n + m).choice(n, m, replace=False))
    idx = jnp.asarray(idx, jnp.int32)
    fn = _jit(lambda x, i: nm.mean_around_median_of(x, i, k))
    assert "byzjax_network" in jax.jit(fn).lower(x, idx).as_text()

    def xla_form(x, i):
        y = nm.take_rows(x, i)
        return nm.coordinate_mean_around(y, nm.coordinate_median(y), k)

    want = _bits(_jit(xla_form)(x, idx))
    np.testing.assert_array_equal(_bits(fn(x, idx)), want)
    # Under jax.vmap, each input with its own rows.
    xs, idxs = jnp.stack([x, x[::-1]]), jnp.stack([idx, idx[::-1]])
    batched = _jit(jax.vmap(lambda x, i: nm.mean_around_median_of(x, i, k)))(xs, idxs)
    np.testing.assert_array_equal(_bits(batched[0]), want)
    np.testing.assert_array_equal(
        _bits(batched[1]), _bits(_jit(xla_form)(xs[1], idxs[1]))
    )


@X_DTYPES
def test_network_rules_vmap_and_differentiate_like_their_xla_forms(dtype):
    # Under jax.vmap (sweeps) the loop runs per input; a derivative (the
    # simulator's influence weights) is the XLA form's. Seven rows: the
    # derivatives of the networks are traced op by op (9 rows took 10 s).
    n, d = 7, 50
    xs = jnp.stack([_network_inputs(s, n, d, dtype) for s in range(3)])
    xs = jnp.where(jnp.isfinite(xs) & (jnp.abs(xs) < 1e30), xs, 0.5)
    rules = {
        "median": lambda x, stored: nm.coordinate_median(x, stored=stored),
        "trimmed": lambda x, stored: nm.coordinate_trimmed_mean(x, 2, stored=stored),
        "mean around median": lambda x, stored: nm.coordinate_mean_around_median(
            x.astype(jnp.float32), 5, stored=stored
        ),
    }
    w = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
    for name, rule in rules.items():
        batched = jax.jit(jax.vmap(lambda x, r=rule: r(x, True)))(xs)
        one = _jit(lambda x, r=rule: r(x, False))
        for i in range(3):
            np.testing.assert_array_equal(
                _bits(batched[i]), _bits(one(xs[i])), err_msg=name
            )

        if dtype != np.float32:
            continue  # the derivatives are taken on float32 rows (below) either way

        def loss(x, stored, r=rule):
            return jnp.sum(r(x.astype(jnp.float32), stored) * w)

        # Both gradients in one program: one compilation of the XLA form's
        # derivative, which both share (mean around the median's took 5-7 s each).
        x = xs[0].astype(jnp.float32)
        grads = _jit(
            lambda x: [
                jax.grad(functools.partial(loss, stored=s))(x) for s in (True, False)
            ]
        )(x)
        np.testing.assert_array_equal(*grads, err_msg=name)


def test_network_loops_are_the_rules_stored_form():
    # The rules take the loop on stored rows only: no ffi call after a
    # pre-aggregator (computed rows stay fused), and none with the kernels off.
    from byzjax import aggregators

    x = jnp.ones((7, 64), jnp.float32)
    for name in ("median", "trimmed_mean", "mean_around_median"):
        agg = aggregators.build(name, f=2)
        for update, calls in ((agg.update, 1), (agg.computed_update, 0)):
            text = jax.jit(lambda x, u=update: u(x, (), ())[0]).lower(x).as_text()
            assert text.count("byzjax_network") == calls, name


def test_network_loops_fall_back_to_xla_when_they_cannot_build(tmp_path, monkeypatch):
    # Without a compiler for AVX2 code (another architecture, say) the rules
    # warn once and keep XLA's loops, with the same values.
    from byzjax._native import networks

    assert _native.enabled()  # the kernels themselves are built already
    script = tmp_path / "cxx"
    script.write_text("#!/bin/sh\necho 'cc 1.0'\n[ \"$1\" = --version ] || exit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("BYZJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(script))
    networks.supported.cache_clear()
    networks._register.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="sorting-network loops"):
            assert not networks.supported()
        x = _network_inputs(0, 7, 40, np.float32)
        fn = jax.jit(lambda x: nm.coordinate_median(x, stored=True))
        assert "byzjax_network" not in fn.lower(x).as_text()
        np.testing.assert_array_equal(_bits(fn(x)), _bits(nm.coordinate_median(x)))
    finally:
        networks.supported.cache_clear()
        networks._register.cache_clear()


def test_avx2_forms_where_the_cpu_has_avx512(tmp_path):
    # The suite's machines have had AVX2 only (AMD Zen 3) and AVX-512 (Intel Xeon,
    # AMD Zen 4). On the latter the kernels build their AVX-512 forms, so the AVX2
    # ones are built here too (a cache of their own) and run through the kernels'
    # oracle tests in a child process; the network loops test both widths above.
    from byzjax._native import networks

    if networks.native_width() != 16:
        pytest.skip("this CPU builds the AVX2 forms already")
    env = {
        **os.environ,
        "BYZJAX_NATIVE_FLAGS": "-mno-avx512f",
        "BYZJAX_CACHE_DIR": str(tmp_path),
    }
    # Not the 2e6-column rows (5 of the child's 22 s): 4e5 columns split over
    # the threads with a tail as well.
    chosen = (
        "(matches_numpy and not 2000003) or rounds_bfloat16 or error_within"
        " or vmap_over"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        + ["-k", chosen],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
