"""Shared numerics against plain NumPy float64, on both code paths of each routine."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax import lax

from byzjax import _numerics as nm
from byzjax import _sorting
from byzjax._rows import column_block, promoted_blocks


def _sanitized(x):
    return np.where(np.isnan(x), np.inf, x).astype(np.float64)


def _with_bad_rows(rng, n, d, bad):
    x = rng.normal(size=(n, d)).astype(np.float32)
    values = [np.nan, np.inf, -np.inf, 1e38]
    for r in range(bad):
        x[r] = values[r % len(values)]
    return x[rng.permutation(n)]


@pytest.mark.parametrize("n", range(1, 11))
def test_batcher_network_sorts_every_zero_one_input(n):
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0-1 inputs.
    pairs = _sorting.batcher_pairs(n)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for a, b in pairs:
            v[a], v[b] = min(v[a], v[b]), max(v[a], v[b])
        assert v == sorted(bits)


@pytest.mark.parametrize("n", range(1, 13))
def test_partition_network_splits_every_zero_one_input(n):
    # 0-1 principle, for each side: the b smallest land on wires [0, b) and the b
    # largest on [n - b, n) for every input iff for every 0-1 input.
    for b in range(n // 2 + 1):
        pairs = _sorting.partition_pairs(n, (b, n - b))
        for bits in itertools.product((0, 1), repeat=n):
            v = list(bits)
            for a, c in pairs:
                v[a], v[c] = min(v[a], v[c]), max(v[a], v[c])
            want = sorted(bits)
            assert sorted(v[:b]) == want[:b] and sorted(v[n - b :]) == want[n - b :]


def test_partition_network_is_pruned():
    assert len(_sorting.partition_pairs(25, (5, 20))) < len(_sorting.batcher_pairs(25))


# Both exchanges (`select`) on each path: the full network (n <= 32), the pruned
# one (33 and 100 rows, by min/max at 33 alone: the same generator), the sort
# (above 128 rows). One column takes the sort at every n; at a few small n here.
ORDER_CASES = [
    *[
        (n, select, 7)
        for n in (1, 2, 3, 16, 25, 33, 129, 130)
        for select in (True, False)
    ],
    (100, True, 7),
    *[(n, True, 1) for n in (1, 2, 3, 16)],
]


@pytest.mark.parametrize("n,select,d", ORDER_CASES)
def test_order_statistics_match_numpy_sort(n, select, d):
    rng = np.random.default_rng(n)
    x = _with_bad_rows(rng, n, d, min(n // 3, 4))
    x[-1] = -0.0  # signed zeros must keep their places among the values
    ks = sorted({0, n // 2, n - 1})
    got = jax.jit(lambda x: _sorting.order_statistics(x, ks, select))(x)
    want = np.sort(_sanitized(x), axis=0)
    for k, g in zip(ks, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float64), want[k])
    if select:  # sort_workers takes no `select`: once per shape
        sort = jax.jit(nm.sort_workers)
        np.testing.assert_array_equal(sort(x), want.astype(np.float32))


@pytest.mark.parametrize("n", [2, 5, 8, 17, 25, 32, 130])
def test_median_and_trimmed_mean_match_numpy(n):
    rng = np.random.default_rng(100 + n)
    b = (n - 1) // 4
    x = _with_bad_rows(rng, n, 9, b)
    s = np.sort(_sanitized(x), axis=0)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    np.testing.assert_allclose(jax.jit(nm.coordinate_median)(x), med, rtol=1e-6)
    tm = s[b : n - b].mean(0)
    got = jax.jit(lambda x: nm.coordinate_trimmed_mean(x, b))(x)
    np.testing.assert_allclose(got, tm, rtol=1e-5, atol=1e-6)


# (honest rows, copies): odd and even n, at n = 100 the median's four honest
# ranks, and copies beyond the middle ranks (both clip ends missing).
COPIES_SHAPES = [(6, 3), (9, 4), (20, 1), (76, 24), (3, 6)]


@pytest.mark.parametrize("h,copies", COPIES_SHAPES)
def test_median_with_copies_matches_numpy_and_the_stacked_rows(h, copies):
    # The median of `copies` rows equal to u and h honest rows, off the honest
    # order statistics and two clips of u: the float64 median of the stacked
    # rows (NaN as +Inf), and coordinate_median's values on them (its zeros'
    # signs aside). u takes normals, honest entries (ties), NaN, +-Inf, 1e38 and
    # zeros; honest rows have non-finite rows too.
    rng = np.random.default_rng(1000 * h + copies)
    d = 301
    x = _with_bad_rows(rng, h, d, min(2, h // 3))
    specials = np.float32([np.nan, np.inf, -np.inf, 1e38, 0.0, -0.0])
    us = [
        rng.normal(size=d).astype(np.float32),
        x[rng.integers(h), :],
        rng.choice(specials, size=d),
    ]
    evaluate = jax.jit(lambda x, u: nm.median_with_copies(x, copies)(u))
    stacked = jax.jit(nm.coordinate_median)
    for u in us:
        got = np.asarray(evaluate(x, u), np.float64)
        rows = np.concatenate([np.tile(u, (copies, 1)), x])
        s = np.sort(_sanitized(rows), axis=0)
        n = h + copies
        with np.errstate(invalid="ignore"):  # -Inf + Inf
            want = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_array_equal(got, np.asarray(stacked(rows), np.float64))


@pytest.mark.parametrize("h,copies,b", [(30, 8, 8), (76, 24, 24), (40, 3, 1)])
def test_trimmed_mean_with_copies_matches_numpy_and_the_stacked_rows(h, copies, b):
    # Above 32 rows the trimmed mean's clip form, its two order statistics off
    # the honest ranks and two clips of u: the float64 trimmed mean of the
    # stacked rows (NaN as +Inf), and the clip form's values on them. u as in
    # the median's test.
    rng = np.random.default_rng(1000 * h + copies)
    d = 301
    x = _with_bad_rows(rng, h, d, min(2, b))
    good = x[np.isfinite(x).all(axis=1)]
    specials = np.float32([np.nan, np.inf, -np.inf, 1e38, 0.0, -0.0])
    us = [
        rng.normal(size=d).astype(np.float32),
        good[rng.integers(len(good))],
        np.where(rng.random(d) < 0.2, rng.choice(specials, size=d), good[0]),
    ]
    evaluate = jax.jit(lambda x, u: nm.trimmed_mean_with_copies(x, copies, b)(u))
    stacked = jax.jit(lambda x: nm.coordinate_trimmed_mean(x, b))
    n = h + copies
    for u in us:
        got = np.asarray(evaluate(x, u), np.float64)
        rows = np.concatenate([np.tile(u, (copies, 1)), x])
        s = np.sort(_sanitized(rows), axis=0)
        want = s[b : n - b].mean(0)
        # float32 sums of 1e38 overflow where float64's do not: those columns
        # are checked against the stacked rows only.
        finite = np.abs(want) < 1e30
        assert finite.mean() > 0.5
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got, np.asarray(stacked(rows), np.float64))


def test_trimmed_mean_with_copies_has_no_form_up_to_32_rows():
    # There the rule sums a partition network's middle wires, in an order the
    # ranks do not give: the attacks stack the rows instead.
    x = jnp.ones((20, 8), jnp.float32)
    assert nm.trimmed_mean_with_copies(x, 5, 5) is None
    assert nm.trimmed_mean_with_copies(x, 13, 0) is None
    assert nm.trimmed_mean_with_copies(x, 13, 5) is not None


@pytest.mark.parametrize("n,k", [(5, 3), (8, 5), (25, 19), (130, 90)])
def test_mean_around_breaks_ties_by_worker_index(n, k):
    rng = np.random.default_rng(n)
    # Small integers make equal deviations on both sides of the centre common.
    x = rng.integers(-3, 4, size=(n, 11)).astype(np.float32)
    x[0] = np.nan
    center = np.zeros(11, np.float32)
    got = jax.jit(lambda x, c: nm.coordinate_mean_around(x, c, k))(x, center)
    dev = np.abs(_sanitized(x) - center)
    want = np.empty(11)
    for j in range(11):
        order = np.lexsort((np.arange(n), dev[:, j]))[:k]
        want[j] = x[order, j].astype(np.float64).mean()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _mean_around_median_oracle(x, k):
    # Per coordinate: the median of the NaN-as-+Inf column, then the k entries
    # closest to it, equal deviations to the lower worker index (SPEC T0).
    s = _sanitized(x).astype(np.float64)
    n = len(s)
    srt = np.sort(s, axis=0)
    med = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
    with np.errstate(invalid="ignore"):
        dev = np.abs(s - med)
    # Inf - Inf (an infinite median) as +Inf: every such deviation ties with the
    # finite entries' +Inf ones, by worker index.
    dev = np.where(np.isnan(dev), np.inf, dev)
    # Per column: by deviation, then by worker index (lexsort: the last key leads).
    workers = np.broadcast_to(np.arange(n)[:, None], s.shape)
    order = np.lexsort((workers, dev), axis=0)[:k]
    return np.take_along_axis(s, order, axis=0).mean(axis=0)


def _two_sided_ties(ties, n, d, rng):
    if ties == "every_block":
        return rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    if ties == "few":
        for j in (0, 3 * 1024 + 17, 16 * 1024, d - 1):
            # Median 0 (13 zeros), 7 of the twelve entries at distance 1 taken:
            # T0 takes the six +1 (lower workers) and one -1 (mean 0.25), the
            # sorted window six -1 and one +1 (mean -0.25).
            x[:, j] = [0.0] * 13 + [1.0] * 6 + [-1.0] * 6
    return x


@functools.cache
def _mean_around_median_jit(k: int, vmapped: bool = False):
    """One jitted `coordinate_mean_around_median(x, k)` per k, shared by the tests
    of one input shape: its XLA form took 5-8 s to compile on the 2-core AMD VM."""

    def fn(x):
        return nm.coordinate_mean_around_median(x, k)

    return jax.jit(jax.vmap(fn) if vmapped else fn)


@pytest.mark.parametrize("vmapped", [False, True])
def test_mean_around_median_two_sided_ties(vmapped):
    # A value outside the window of the sorted column exactly as far from the
    # median as one inside on the other side: T0 picks by worker index, which the
    # sorted column has lost (a few such columns among many: the gathered
    # blocks; ties everywhere: the whole array). Alone, each input takes one
    # side of the fix's `lax.cond`; vmapped, both and a column-free input in one
    # batch, where the cond runs both sides for the whole batch and must change
    # only the inputs that need it.
    n, k, d = 25, 20, 17 * 1024 + 5
    rng = np.random.default_rng(7)
    kinds = ["none", "few", "every_block"] if vmapped else ["few", "every_block"]
    x = np.stack([_two_sided_ties(kind, n, d, rng) for kind in kinds])
    if vmapped:
        got = _mean_around_median_jit(k, vmapped=True)(x)
    else:  # one compilation for both
        got = [_mean_around_median_jit(k)(x_i) for x_i in x]
    for got_i, x_i, kind in zip(got, x, kinds, strict=True):
        np.testing.assert_allclose(
            got_i,
            _mean_around_median_oracle(x_i, k),
            rtol=1e-5,
            atol=1e-6,
            err_msg=kind,
        )


@pytest.mark.parametrize("d", [1, 7, 1024, 3 * 1024, 5 * 1024 + 37])
def test_nan_checks_find_every_nan_block(d):
    # `any_nan` and `_nan_blocks` (sums, where XLA:CPU's max reduction would miss
    # the NaN) against numpy's per-block isnan, NaN in random blocks and in the
    # tail; +-Inf alone is no NaN, +Inf with -Inf is a documented false positive.
    rng = np.random.default_rng(d)
    width = 1024
    count = -(-d // width)
    check = jax.jit(lambda v: (nm.any_nan(v), nm._nan_blocks(v, width)))
    for hits in range(3):
        v = rng.normal(size=d).astype(np.float32)
        v[rng.choice(d, size=min(hits, d), replace=False)] = np.nan
        v[rng.random(d) < 0.01] = np.inf
        padded = np.pad(np.isnan(v), (0, count * width - d)).reshape(count, width)
        any_nan, blocks = check(v)
        assert bool(any_nan) == bool(np.isnan(v).any())
        np.testing.assert_array_equal(blocks, padded.any(axis=1))
    both = np.zeros(d, np.float32)
    both[0], both[-1] = np.inf, -np.inf
    assert bool(check(both)[0]) == (d > 1)


@pytest.mark.parametrize("vmapped", [False, True])
def test_patch_if_runs_the_fix_only_when_asked(vmapped):
    # Under vmap a lax.cond runs both sides; patch_if must not run the fix when no
    # input asks for it (counted by a callback), and must fix only those that do.
    calls = []

    def fix(value, operand):
        jax.debug.callback(lambda: calls.append(1))
        return value + operand

    def fn(pred, value):
        return nm.patch_if(pred, fix, value, 10.0 * value)

    fn = jax.jit(jax.vmap(fn) if vmapped else fn)
    value = np.arange(1.0, 4.0, dtype=np.float32)
    if vmapped:
        clean = fn(np.zeros(3, bool), value)
        jax.effects_barrier()
        assert calls == [] and np.array_equal(clean, value)
        fixed = fn(np.array([False, True, False]), value)
        np.testing.assert_array_equal(fixed, [1.0, 22.0, 3.0])
    else:
        for pred in (False, True):
            np.testing.assert_array_equal(fn(pred, value), value * (1 + 10 * pred))
        jax.effects_barrier()
        assert len(calls) == 1


@pytest.mark.parametrize("n,k", [(5, 3), (6, 4), (25, 20), (25, 5), (32, 24), (40, 30)])
def test_mean_around_median_window_matches_the_general_form(n, k):
    # "normal": the one-pass path; "ties": small integers put equal deviations on
    # both sides of the median (taken by worker index, still in one pass);
    # "broken": NaN / Inf rows (n = 40: the general form only); "majority": a
    # column more than half +Inf, whose median is not finite (the general form).
    # One input shape for the four: one compilation.
    rng = np.random.default_rng(n * 100 + k)
    fn = _mean_around_median_jit(k)
    for data in ("normal", "ties", "broken", "majority"):
        if data == "ties":
            x = rng.integers(-3, 4, size=(n, 4099)).astype(np.float32)
        else:
            x = rng.normal(size=(n, 4099)).astype(np.float32)
        if data == "broken":
            x[0], x[1] = np.nan, np.inf
        if data == "majority":
            x[: n // 2 + 1, 7] = np.inf
        got = np.asarray(fn(x))
        want = _mean_around_median_oracle(x, k)
        if data == "majority":
            # Beyond the breakdown point every deviation from the infinite median
            # is +Inf: T0 takes the k first workers, +Inf among them (the general
            # form's answer too).
            assert want[7] == np.inf
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=data)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("n,d", [(5, 300), (7, 4133), (40, 16500)])
def test_pairwise_sq_dists_match_numpy_on_every_path(n, d, native, monkeypatch):
    # The CPU kernel (native), else: d >= 2 blocks takes the blocked CPU Gram,
    # small d the single matmul.
    monkeypatch.setenv("BYZJAX_NATIVE", native)
    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)).astype(np.float32) + 3.0
    x[1] = np.nan
    center = np.median(x[2:], axis=0).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, c: nm.pairwise_sq_dists(x, c))(x, center))
    x64 = x.astype(np.float64)
    want = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    want[1, :] = want[:, 1] = np.inf
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_centered_gram_blocks_match_numpy(backend, dtype):
    # Each backend's blocks, run here: the CPU's 2,048 columns, an accelerator's
    # eighth of d (at least 2**16: two blocks and a remainder at this d), each
    # promoted and centred on its own; the bound is float32 rounding of the sums
    # of |products|.
    n, d = 6, 140_001
    block = nm.gram_block(n, d, backend)
    assert block < d
    rng = np.random.default_rng([6, backend == "gpu", dtype == jnp.bfloat16])
    x = jnp.asarray(rng.normal(size=(n, d)) + 3.0, dtype)
    x64 = np.asarray(x, np.float64)
    center = jnp.asarray(np.median(x64, axis=0), jnp.float32)
    got = jax.jit(nm.centered_gram, static_argnums=2)(x, center, block)
    xc = x64 - np.asarray(center, np.float64)
    bound = 1e-5 * (np.abs(xc) @ np.abs(xc).T)
    assert np.all(np.abs(np.asarray(got, np.float64) - xc @ xc.T) <= bound)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_centered_gram_on_an_accelerator_writes_one_block(dtype):
    # The memory target on a GPU: no centred or promoted copy of the whole of x
    # (a product cannot fuse either), one float32 block at a time.
    n, d = 16, 1 << 21
    block = nm.gram_block(n, d, "gpu")
    assert 8 * block == d
    x = jax.ShapeDtypeStruct((n, d), dtype)
    center = jax.ShapeDtypeStruct((d,), jnp.float32)
    fn = jax.jit(lambda x, c: nm.centered_gram(x, c, block))
    temp = fn.lower(x, center).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.1 * n * block * 4, f"{temp / 1e6:.1f} MB of temporaries"


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_promoted_blocks_cover_every_column_once(backend):
    # Each backend's blocks, run here; the last block overlaps the one before it
    # (d is no multiple of either width), and its columns must come out once.
    n, d = 5, 140_001
    block = column_block(d, 4096, backend)
    assert block < d and d % block
    rng = np.random.default_rng(int(backend == "gpu"))
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)

    def fn(xb):
        assert xb.dtype == jnp.float32 and xb.shape == (n, block)
        return xb.sum(axis=0)

    got = jax.jit(lambda x: promoted_blocks(fn, x, block))(x)
    want = np.asarray(x, np.float64).sum(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_dots_match_numpy(dtype):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(9, 301)), dtype)
    w = rng.normal(size=301).astype(np.float32)
    want = np.asarray(x, np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(jax.jit(nm.row_dots)(x, w), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [21, 30, 39])
def test_mean_around_median_above_32_rows_finds_every_window(k, dtype, stored):
    # The XLA form above 32 rows takes delta as the least of the windows' larger
    # ends (`_sorting.window_ends`); stored float32 rows on the CPU, the window
    # loop sums the window (`networks.window_mean_source`). Each column holds k
    # Gaussian values among far ones, s of them below and the rest above, s
    # uniform in [0, n - k]: the k closest to the median are the window at rank
    # s, the first and the last window included. Against the float64 oracle.
    n, d = 40, 600
    rng = np.random.default_rng(k)
    s = rng.integers(0, n - k + 1, size=d)
    far = 10.0 + rng.exponential(size=(n - k, d))
    far = np.where(np.arange(n - k)[:, None] < s, -far, far)
    x = np.concatenate([rng.normal(size=(k, d)), far])
    x = np.take_along_axis(x, rng.permuted(np.tile(np.arange(n), (d, 1)), axis=1).T, 0)
    x = jnp.asarray(x, dtype)
    got = jax.jit(lambda x: nm.coordinate_mean_around_median(x, k, stored=stored))(x)
    want = reference.mean_around_median(np.asarray(x, np.float64), keep=k)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [104, 112])
def test_mean_around_median_xla_form_above_104_rows_writes_its_median_out(n):
    # Above 104 rows the XLA form writes m and delta out before the pass over the
    # rows (`materialized`: a while loop XLA keeps), which at 128 rows otherwise
    # recomputed the network for their uses, in one loop. Against the float64
    # oracle, with ALIE's equal rows (ties at the k-th deviation) and a NaN row.
    k = n - (n // 4 - 1)
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 300))
    x[: n - k] = x.mean(0) + 1.5 * x.std(0)
    x[-1] = np.nan
    x = jnp.asarray(x, jnp.float32)
    fn = jax.jit(lambda x: nm._mean_around_own_median(x, k))
    # XLA keeps the loop (one whose body leaves its carry as it is, it removes).
    compiled = fn.lower(x).compile().as_text()
    assert ("while" in compiled) == (n > nm._FUSED_PASS_MAX_N)
    want = reference.mean_around_median(np.asarray(x, np.float64), keep=k)
    np.testing.assert_allclose(
        np.asarray(fn(x), np.float64), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("n", [1, 2, 7, 25])
def test_row_sum_and_norms(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 13)).astype(np.float32)
    np.testing.assert_allclose(
        jax.jit(nm.row_sum)(x), x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-6
    )
    x[0] = 1e38
    want = np.linalg.norm(x.astype(np.float64), axis=1)
    want[0] = np.inf  # squared norm overflows float32: treated as +Inf
    np.testing.assert_allclose(jax.jit(nm.norms)(x), want, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 25, 40])
def test_row_helpers_match_numpy(n):
    rng = np.random.default_rng(300 + n)
    x = rng.normal(size=(n, 37)).astype(np.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(
        jax.jit(nm.dot_mean)(x), x64.mean(0), rtol=1e-5, atol=1e-6
    )
    idx = rng.integers(0, n, size=7).astype(np.int32)
    np.testing.assert_array_equal(jax.jit(nm.take_rows)(x, idx), x[idx])
    scaled = jax.jit(lambda x: nm.stack_rows(lambda i: x[i] * (i + 1), n))(x)
    np.testing.assert_allclose(scaled, x * np.arange(1, n + 1)[:, None], rtol=1e-6)
    total = jax.jit(lambda x: nm.sum_rows(lambda i: x[i] * (i + 1), n))(x)
    want = (x64 * np.arange(1, n + 1)[:, None]).sum(0)
    np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("broken", [0, 1, 3])
def test_weighted_row_sum_drops_rows_exactly_on_both_branches(
    broken, native, monkeypatch
):
    # Off the kernels broken = 0 takes the matrix-vector product, otherwise the
    # row-by-row branch; through them the step kernel skips the dropped rows.
    monkeypatch.setenv("BYZJAX_NATIVE", native)
    rng = np.random.default_rng(broken)
    n = 9
    x = rng.normal(size=(n, 23)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    keep = np.ones(n, bool)
    for r, value in zip(range(broken), [np.nan, np.inf, -np.inf], strict=False):
        x[2 * r + 1] = value
        keep[2 * r + 1] = False
    got = jax.jit(lambda *a: nm.weighted_row_sum(*a))(w, x, keep)
    got = np.asarray(got, np.float64)
    want = (w[keep, None].astype(np.float64) * x[keep].astype(np.float64)).sum(0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weighted_row_sum_reads_x_once_under_vmap():
    # Sweeps vmap the rules (centered clipping, Multi-Krum, the geometric
    # median): a cond of a product and the row-by-row form would run both there.
    if not nm.kernel_rows(jnp.ones((2, 2), jnp.float32)):
        pytest.skip("the CPU kernels are off")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 9, 23)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=(3, 9)).astype(np.float32)
    keep = np.ones((3, 9), bool)
    x[1, 4], keep[1, 4] = np.nan, False
    fn = jax.jit(jax.vmap(nm.weighted_row_sum))
    got = np.asarray(fn(w, x, keep), np.float64)
    for b in range(3):
        k = keep[b]
        want = (w[b, k, None].astype(np.float64) * x[b, k].astype(np.float64)).sum(0)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
    hlo = fn.lower(w, x, keep).compile().as_text()
    assert hlo.count('custom_call_target="byzjax_step_sq_dists"') == 1
    assert " dot(" not in hlo and "conditional(" not in hlo


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("n,d", [(1, 3), (6, 1000)])
def test_row_sq_dists_match_numpy_on_every_path(n, d, native, monkeypatch):
    monkeypatch.setenv("BYZJAX_NATIVE", native)
    rng = np.random.default_rng(n * d)
    x = _with_bad_rows(rng, n, d, bad=min(n, 2))
    v = rng.normal(size=d).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, v: nm.row_sq_dists(x, v))(x, v))
    with np.errstate(invalid="ignore", over="ignore"):
        want = ((x.astype(np.float64) - v) ** 2).sum(-1)
    want = np.where(np.isnan(want) | (want > np.finfo(np.float32).max), np.inf, want)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("vmapped", [False, True])
def test_patch_if_differentiates_like_a_cond(vmapped):
    # The simulator's influence weights take a VJP through the rules, and a
    # while loop has no transpose: both modes must give the cond's derivative,
    # and a fix whose value is NaN where it is not taken must not leak it.
    def fix(value, x):
        return value * x**2 + jnp.log(x)  # NaN at x < 0, where pred is False

    def by_patch(pred, value, x):
        return nm.patch_if(pred, fix, value, x).sum()

    def by_cond(pred, value, x):
        return lax.cond(pred, fix, lambda v, x: v, value, x).sum()

    value = np.arange(1.0, 4.0, dtype=np.float32)
    for pred, x in ((True, value + 1.0), (False, -value)):
        args = (np.array(pred), value, x.astype(np.float32))
        grad = jax.grad(by_patch, argnums=(1, 2))
        want = jax.grad(by_cond, argnums=(1, 2))(*args)
        if vmapped:
            batch = [np.stack([a, a]) for a in args]
            got = jax.jit(jax.vmap(grad))(*batch)
            got = [g[0] for g in got]
        else:
            got = jax.jit(grad)(*args)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
            assert np.isfinite(a).all()
        tangent = jax.jvp(
            lambda v, a=args: nm.patch_if(a[0], fix, v, a[2]), (value,), (value,)
        )[1]
        np.testing.assert_allclose(
            tangent, value * (args[2] ** 2 if pred else 1.0), rtol=1e-6
        )


@pytest.mark.parametrize("vmapped", [False, True])
def test_lazy_cond_runs_only_the_sides_asked_for(vmapped):
    calls = {"true": 0, "false": 0}

    def side(name, scale):
        def fn(v):
            jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
            return v * scale

        return fn

    def fn(pred, value):
        return nm.lazy_cond(pred, side("true", 2.0), side("false", -1.0), value)

    fn = jax.jit(jax.vmap(fn) if vmapped else fn)
    value = np.arange(1.0, 4.0, dtype=np.float32)
    preds = [np.ones(3, bool), np.array([True, False, True])] if vmapped else [True]
    want = [value * 2.0, np.array([2.0, -2.0, 6.0], np.float32)]
    np.testing.assert_array_equal(fn(preds[0], value), want[0])
    jax.effects_barrier()
    assert calls == {"true": 1, "false": 0}
    if vmapped:
        np.testing.assert_array_equal(fn(preds[1], value), want[1])
        jax.effects_barrier()
        assert calls == {"true": 2, "false": 1}


@pytest.mark.parametrize("d", [2 * 4096 + 37, 4096, 100])
def test_promoted_blocks_covers_every_column(d):
    # Blocks of 4,096 columns, the last one overlapping the one before it: each
    # column's result must be fn's on the whole promoted array (columns are
    # independent), and a float32 input goes through fn whole.
    from byzjax import _rows

    rng = np.random.default_rng(d)
    # Few rows: any rule whose columns are independent tests the blocks (the
    # general form's compilation grows with n, 2-3 s for each of three at n = 40).
    x = jnp.asarray(rng.normal(size=(9, d)), jnp.bfloat16)
    k = 6

    def fn(x):
        return nm.coordinate_mean_around(x, nm.coordinate_median(x), k)

    got = jax.jit(lambda x: _rows.promoted_blocks(fn, x))(x)
    want = jax.jit(fn)(x.astype(jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        got,
        _mean_around_median_oracle(np.asarray(x, np.float32), k),
        rtol=1e-5,
        atol=1e-6,
    )
    x32 = x.astype(jnp.float32)
    np.testing.assert_array_equal(
        jax.jit(lambda x: _rows.promoted_blocks(fn, x))(x32), want
    )
