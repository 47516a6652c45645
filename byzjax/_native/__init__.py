"""CPU kernels behind XLA's foreign function interface, built on first use.

XLA:CPU runs some reductions far from this hardware's speed (docs/performance.md):
the pairwise squared distances of the distance rules (its GEMM does the skinny
Gram matrix at 5-7 GFLOP/s, a loop of small products runs on one core) and the
distances of every row to one vector (a row reduction that re-reads the vector for
every row). `kernels.cc` computes both directly from differences, with no Gram
matrix and hence no cancellation, on every core the process may use; a
reweighting step (`step_sq_dists`: a weighted sum of the rows, then every row's
distance to it) in one read of x instead of two; and the Gram matrix of the rows
around a centre (`gram`), for the geometric median's steps on it, with a bound on
its rounding (`gram_error`); and NNM's product of a mixing matrix with the rows
(`mix_rows`), with the rows it must clean cleaned as they are read, streaming its
output to memory. Their JVP rules give a non-finite entry no derivative.

The shared library is compiled with the system C++ compiler the first time a rule
asks for it (about 25 s on the 2-core Xeon; processes that need it at once wait
for one build) and cached under `$BYZJAX_CACHE_DIR` (default `~/.cache/byzjax`),
keyed by the source, jax's version, the compiler, its flags and the CPU. It is
built for this CPU (`-march=native`): with AVX-512 the distance and
row kernels and the network loops take 16 columns a step, else AVX2's 8.
`$BYZJAX_NATIVE_FLAGS` adds compiler flags (`-mno-avx512f` builds the AVX2 forms on
an AVX-512 CPU, as the suite does to test both).
Without a compiler, or with `BYZJAX_NATIVE=0`, `enabled()` is False and the
rules use their pure-XLA forms, which compute the same quantities (tested against
the same float64 oracle). Only the CPU backend goes through the kernels: float32
or bfloat16 rows for the distances (read as stored, widened to float32 as they are
loaded, so a bfloat16 x needs no float32 copy; every other operand and the
distances are float32); `row_rule` (the mean and the sign majority of stored
float32 or bfloat16 rows): XLA:CPU's loops over 16-bit elements are scalar, and
its fused loops over many rows read them as interleaved streams; `network` (the
sorting-network rules over n <= 32 stored rows, in loops generated per network by
`networks.py`; the median, trimmed mean and mean around the median up to 128
rows): XLA's fused loop streams the rows without prefetching them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:
    import fcntl
except ImportError:  # not POSIX: builds race, each under its own temporary name
    fcntl = None

_SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
_TARGETS = {
    "byzjax_pairwise_sq_dists": "ByzjaxPairwiseSqDists",
    "byzjax_row_sq_dists": "ByzjaxRowSqDists",
    "byzjax_row_sq_norms": "ByzjaxRowSqNorms",
    "byzjax_row_moments": "ByzjaxRowMoments",
    "byzjax_step_sq_dists": "ByzjaxStepSqDists",
    "byzjax_gram": "ByzjaxGram",
    "byzjax_mix_rows": "ByzjaxMixRows",
    "byzjax_pairwise_sq_dists_bf16": "ByzjaxPairwiseSqDistsBf16",
    "byzjax_row_sq_dists_bf16": "ByzjaxRowSqDistsBf16",
    "byzjax_row_sq_norms_bf16": "ByzjaxRowSqNormsBf16",
    "byzjax_row_moments_bf16": "ByzjaxRowMomentsBf16",
    "byzjax_step_sq_dists_bf16": "ByzjaxStepSqDistsBf16",
    "byzjax_gram_bf16": "ByzjaxGramBf16",
    "byzjax_mix_rows_bf16": "ByzjaxMixRowsBf16",
    "byzjax_bf16_rows": "ByzjaxBf16Rows",
    "byzjax_f32_rows": "ByzjaxF32Rows",
    "byzjax_network": "ByzjaxNetwork",
    "byzjax_network_bf16": "ByzjaxNetworkBf16",
}


def enabled() -> bool:
    """Whether float32 CPU computations should use the kernels (`BYZJAX_NATIVE`)."""
    return os.environ.get("BYZJAX_NATIVE", "1") != "0" and _library() is not None


def usable(*arrays: jax.Array, dtypes=(jnp.float32,)) -> bool:
    """True when these arrays' computation can go through the kernels: the CPU
    backend, every array of one of `dtypes` (float32 for the distance kernels;
    `row_rule` also takes bfloat16)."""
    return (
        jax.default_backend() == "cpu"
        and all(a.dtype in dtypes for a in arrays)
        and enabled()
    )


def _distance_target(name: str, x: jax.Array, **float32_operands) -> str:
    """The kernel for x's dtype (float32, or bfloat16 read without a float32
    copy); the other operands must be float32."""
    _require()
    for operand, value in float32_operands.items():
        if jnp.result_type(value) != jnp.float32:
            raise TypeError(
                f"byzjax: {name}'s {operand} must be float32, got "
                f"{jnp.result_type(value)}"
            )
    dtype = jnp.result_type(x)
    if dtype == jnp.float32:
        return f"byzjax_{name}"
    if dtype == jnp.bfloat16:
        return f"byzjax_{name}_bf16"
    raise TypeError(f"byzjax: {name}'s x must be float32 or bfloat16, got {dtype}")


def _finite(a: jax.Array) -> jax.Array:
    """a with its non-finite entries zeroed, for the JVP rules: a NaN or infinite
    entry contributes no derivative (its row's weight in the rules is 0), where
    0 * Inf in a reverse pass would turn every cotangent NaN (the simulator's
    influence weights under the nan and inf attacks)."""
    return jnp.where(jnp.isfinite(a), a, 0.0)


@jax.custom_jvp
def pairwise_sq_dists(x: jax.Array) -> jax.Array:
    """D_ij = sum_k (x_ik - x_jk)^2 of a (..., n, d) float32 or bfloat16 array, in
    float32; NaN/Inf flow."""
    target = _distance_target("pairwise_sq_dists", x)
    n = x.shape[-2]
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return call(x)


@pairwise_sq_dists.defjvp
def _pairwise_jvp(primals, tangents):
    # dD_ij = 2 (x_i - x_j).(t_i - t_j) = 2 (P_ii + P_jj - P_ij - P_ji), P = x t^T:
    # linear in t, so reverse mode (the simulator's influence weights) works too.
    # A bfloat16 x and its tangent are widened: the distances are float32.
    (x,), (t,) = primals, tangents
    out = pairwise_sq_dists(x)
    x, t = _finite(x.astype(jnp.float32)), t.astype(jnp.float32)
    p = jnp.einsum("...id,...jd->...ij", x, t, precision=lax.Precision.HIGHEST)
    diag = jnp.diagonal(p, axis1=-2, axis2=-1)
    dd = 2.0 * (diag[..., :, None] + diag[..., None, :] - p - jnp.swapaxes(p, -1, -2))
    return out, dd


@jax.custom_jvp
def row_sq_dists(x: jax.Array, v: jax.Array) -> jax.Array:
    """r_i = sum_k (x_ik - v_k)^2 of a (..., n, d) float32 or bfloat16 array and a
    (..., d) float32 vector, in float32."""
    target = _distance_target("row_sq_dists", x, v=v)
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return call(x, v)


@row_sq_dists.defjvp
def _row_jvp(primals, tangents):
    # dr_i = 2 (x_i - v).(t_i - s), linear in the tangents (t, s).
    (x, v), (t, s) = primals, tangents
    out = row_sq_dists(x, v)
    x, t = x.astype(jnp.float32), t.astype(jnp.float32)
    diff = _finite(x - v[..., None, :])
    hi = lax.Precision.HIGHEST
    dr = jnp.einsum("...nd,...nd->...n", diff, t, precision=hi) - jnp.einsum(
        "...nd,...d->...n", diff, s, precision=hi
    )
    return out, 2.0 * dr


@jax.custom_jvp
def row_sq_norms(x: jax.Array) -> jax.Array:
    """r_i = sum_k x_ik^2 of a (..., n, d) float32 or bfloat16 array, in float32:
    `row_sq_dists` without v, one read of x."""
    target = _distance_target("row_sq_norms", x)
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(x)


@row_sq_norms.defjvp
def _norms_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    finite = _finite(x.astype(jnp.float32))
    dr = jnp.einsum(
        "...nd,...nd->...n",
        finite,
        t.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    return row_sq_norms(x), 2.0 * dr


@jax.custom_jvp
def row_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The column means of a (..., n, d) float32 or bfloat16 array and the sums of
    squared deviations from them, sum_i (x_ik - mu_k)^2, both (..., d) float32, in
    one read of x. Returns (mu, m2)."""
    target = _distance_target("row_moments", x)
    shape = jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.float32)
    call = jax.ffi.ffi_call(target, (shape, shape), vmap_method="broadcast_all")
    return tuple(call(x))


@row_moments.defjvp
def _moments_jvp(primals, tangents):
    # dmu = mean_i dx_i, dm2 = 2 sum_i (x_i - mu)(dx_i - dmu).
    (x,), (t,) = primals, tangents
    mu, m2 = row_moments(x)
    t = t.astype(jnp.float32)
    dmu = jnp.mean(t, axis=-2)
    dev = x.astype(jnp.float32) - mu[..., None, :]
    dm2 = 2.0 * jnp.sum(dev * (t - dmu[..., None, :]), axis=-2)
    return (mu, m2), (dmu, dm2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def step_sq_dists(
    x: jax.Array, z: jax.Array, w: jax.Array, distances: bool = True
) -> tuple[jax.Array, jax.Array]:
    """One reweighting step in one read of a (..., n, d) float32 or bfloat16 array.

    z' = z (1 - sum_i w_i) + sum_{i: w_i != 0} w_i x_i (a row of weight 0 adds
    nothing, even if it is not finite) and r_i = ||x_i - z'||^2 (zeros when not
    `distances`). z (..., d) and w (..., n) are float32, and so are the results;
    an empty z (shape (0,)) stands for zeros and is not read (z' is then the
    rows' weighted sum). Returns (z', r).
    """
    target = _distance_target("step_sq_dists", x, z=z, w=w)
    out = (
        jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.float32),
        jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return tuple(call(x, z, w, distances=np.int32(distances)))


@step_sq_dists.defjvp
def _step_jvp(distances, primals, tangents):
    # dz' = dz (1 - sum w) - z sum dw + sum_i (dw_i x_i + w_i dx_i), x_i and dx_i
    # zeroed where w_i = 0 (the kernel skips those rows), and
    # dr_i = 2 (x_i - z').(dx_i - dz'): linear in the tangents.
    (x, z, w), (dx, dz, dw) = primals, tangents
    hi = lax.Precision.HIGHEST
    zn, r = step_sq_dists(x, z, w, distances)
    if z.shape[-1] == 0 and x.shape[-1] != 0:  # the empty z: zeros
        z = dz = jnp.zeros(zn.shape, jnp.float32)
    x, dx = x.astype(jnp.float32), dx.astype(jnp.float32)
    on = (w != 0)[..., None]
    xs, dxs = jnp.where(on, x, 0.0), jnp.where(on, dx, 0.0)
    dzn = (
        dz * (1.0 - w.sum(-1, keepdims=True))
        - z * dw.sum(-1, keepdims=True)
        + jnp.einsum("...n,...nd->...d", dw, xs, precision=hi)
        + jnp.einsum("...n,...nd->...d", w, dxs, precision=hi)
    )
    diff = _finite(x - zn[..., None, :])
    dr = jnp.einsum("...nd,...nd->...n", diff, dx, precision=hi) - jnp.einsum(
        "...nd,...d->...n", diff, dzn, precision=hi
    )
    return (zn, r), (dzn, 2.0 * dr if distances else jnp.zeros_like(r))


@jax.custom_jvp
def gram(x: jax.Array, c: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The Gram matrix of the rows centred on c, and the rows' squared norms, in
    one read of a (..., n, d) float32 or bfloat16 array.

    G_ij = sum_k (x_ik - c_k)(x_jk - c_k) (c = 0 when None) and q_i = ||x_i||^2,
    in float32: products summed in float32 over runs of 512 columns, then in
    float64 (`gram_error`). c (..., d) is float32. Returns (G, q).
    """
    if c is None:
        c = jnp.zeros(x.shape[:-2] + (0,), jnp.float32)
    target = _distance_target("gram", x, c=c)
    n = x.shape[-2]
    out = (
        jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
        jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return tuple(call(x, c))


_UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2

# Relative error bound of the distance kernels' squared distances (`row_sq_dists`,
# `step_sq_dists`): each float32 lane sums 2,048 non-negative terms (blocks of
# 32,768 columns over 16 lanes) before the float64 sum of the blocks.
DIRECT_SQ_ERROR = 2048 * _UNIT_ROUNDOFF


def gram_error(n: int) -> float:
    """A bound on the rounding error of a quantity computed from `gram`'s entries,
    relative to sum_ij |w_i w_j| |y_i| |y_j| (y the centred rows): a run of 64
    sums in each float32 lane, the lanes' and the rounding to float32 (3 + 1),
    and 3n float32 operations of the caller's products of G with (n,) vectors
    (the geometric median's distances)."""
    return (512 // 8 + 4 + 3 * n) * _UNIT_ROUNDOFF


@gram.defjvp
def _gram_jvp(primals, tangents):
    # dG = (dx - dc)(x - c)^T + (x - c)(dx - dc)^T, dq_i = 2 x_i.dx_i.
    (x, c), (dx, dc) = primals, tangents
    g, q = gram(x, c)
    hi = lax.Precision.HIGHEST
    x, dx = x.astype(jnp.float32), dx.astype(jnp.float32)
    y, dy = x, dx
    if c is not None:
        y, dy = x - c[..., None, :], dx - dc[..., None, :]
    p = jnp.einsum("...id,...jd->...ij", dy, _finite(y), precision=hi)
    dq = 2.0 * jnp.einsum("...nd,...nd->...n", _finite(x), dx, precision=hi)
    return (g, q), (p + jnp.swapaxes(p, -1, -2), dq)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 4, 5))
def mix_rows(
    x: jax.Array,
    w: jax.Array,
    scale: float = 1.0,
    clean: jax.Array | None = None,
    sparse: bool = False,
    pairs: bool | None = None,
) -> jax.Array:
    """scale * (w @ x) for a (..., n, d) float32 or bfloat16 x and a (..., m, n)
    float32 w, (..., m, d) float32: each output row a weighted sum of the rows
    (NNM's mixing), summed over j in order in float32, times the static `scale`;
    NaN/Inf flow as in a product (0 * Inf is NaN). `sparse` (static): a row of
    weight 0 adds nothing, even if it is not finite (bucketing's means; one
    output row at a time, for few weights a row). Rows j with clean[j] (a
    (..., n) bool, default none) count their non-finite entries as zeros.
    `pairs` (static; None: `bf16_pairs()`): a bfloat16 x and a dense w of
    bfloat16 entries (NNM's ones) summed two rows a float32 lane (`vdpbf16ps`,
    which reads bfloat16 subnormals as zeros), where the kernels have it."""
    target = _distance_target("mix_rows", x, w=w)
    if clean is None:
        clean = jnp.zeros(x.shape[:-1], bool)
    out = jax.ShapeDtypeStruct(w.shape[:-1] + x.shape[-1:], jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return call(
        x,
        w,
        clean.astype(jnp.int32),
        scale=np.float32(scale),
        sparse=np.int32(sparse),
        pairs=np.int32(bf16_pairs() if pairs is None else pairs),
    )


@functools.cache
def bf16_pairs() -> bool:
    """Whether `mix_rows` sums bfloat16 rows two a lane by default: on AMD's CPUs
    with AVX512-BF16, where Zen 4 runs `vdpbf16ps` (32 products) at the rate of a
    16-lane multiply-add (twice the products); the Xeon of model 167 ran it at a
    quarter of that (half the products; docs/performance.md, sessions 32 and
    33)."""
    info = cpu_info()
    amd = info.get("vendor_id") == "AuthenticAMD"
    return amd and "avx512_bf16" in info.get("flags", "").split()


@mix_rows.defjvp
def _mix_jvp(scale, sparse, pairs, primals, tangents):
    # d(s w c(x)) = s (dw c(x) + w c'(dx)), c zeroing the cleaned rows' non-finite
    # entries (and their tangents): linear in the tangents, as products XLA can
    # transpose (reverse mode); any non-finite entry gives dw no derivative.
    (x, w, clean), (dx, dw, _) = primals, tangents
    hi = lax.Precision.HIGHEST
    out = mix_rows(x, w, scale, clean, sparse, pairs)
    x, dx = x.astype(jnp.float32), dx.astype(jnp.float32)
    if clean is not None:
        dx = jnp.where(clean[..., None] & ~jnp.isfinite(x), 0.0, dx)
    dout = jnp.matmul(dw, _finite(x), precision=hi) + jnp.matmul(w, dx, precision=hi)
    return out, scale * dout


# Modes of `row_rule`: which rule it computes.
MEAN, SIGN_MAJORITY, SIGN_MAJORITY_ZERO_UP = 0, 1, 2


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def row_rule(x: jax.Array, mode: int) -> jax.Array:
    """A rule over the rows of a (..., n, d) float32 or bfloat16 array, (..., d).

    MEAN: the mean of the rows. SIGN_MAJORITY: sign(sum_i sign(x_i)), NaN voting
    nothing. SIGN_MAJORITY_ZERO_UP: the same with 0 mapped to +1 in the votes and
    in the result. Computed in float32; a bfloat16 result is rounded to nearest
    even at the end.
    """
    _require()
    target = {jnp.bfloat16: "byzjax_bf16_rows", jnp.float32: "byzjax_f32_rows"}
    out = jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], x.dtype)
    call = jax.ffi.ffi_call(target[x.dtype.type], out, vmap_method="broadcast_all")
    return call(x, mode=np.int32(mode))


@row_rule.defjvp
def _row_rule_jvp(mode, primals, tangents):
    # The mean is linear; the signs are piecewise constant (zero derivative).
    (x,), (t,) = primals, tangents
    out = row_rule(x, mode)
    if mode == MEAN:
        return out, jnp.mean(t.astype(jnp.float32), axis=-2).astype(out.dtype)
    return out, jnp.zeros_like(out)


def _require() -> ctypes.CDLL:
    """The kernels' library (its targets are registered when it is first loaded)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("byzjax: the CPU kernels are not available")
    return lib


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `flags`, `cpu
    family`, `model`, ...); empty where there is no such file."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_signature() -> str:
    info = cpu_info()
    if not info:
        return platform.processor()
    return f"{info.get('model name', '')}\n{info.get('flags', '')}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> pathlib.Path:
    """$BYZJAX_CACHE_DIR, else the user cache, else (no usable home) a temp dir."""
    root = os.environ.get("BYZJAX_CACHE_DIR")
    if root:
        return pathlib.Path(root)
    fallback = pathlib.Path(tempfile.gettempdir()) / f"byzjax-{os.getuid()}"
    try:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
        cache = base / "byzjax"
        cache.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: no home directory at all
        return fallback
    return cache if os.access(cache, os.W_OK) else fallback


def _build_shared(
    source: str,
    stem: str,
    flags=("-O3", "-march=native"),
    header: tuple[str, str] | None = None,
    parts: int = 1,
) -> pathlib.Path:
    """Compiles C++ `source` into a shared library once per (source, jax, compiler,
    flags, CPU), cached as `{stem}-{key}.so`; returns its path. `header` (name,
    text): a header the source includes by that name, precompiled once per
    (text, compiler, flags, CPU) beside the libraries (`_precompiled`). `parts`
    > 1: the source compiled that many times at once, with BYZJAX_PART = 0, 1,
    ... (each part's code under its own #if), and the objects linked."""
    cxx = _compiler()
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=True
    ).stdout
    extra = shlex.split(os.environ.get("BYZJAX_NATIVE_FLAGS", ""))
    flags = [*flags, *extra, "-std=c++17", "-shared", "-fPIC", "-pthread"]
    signature = [jax.__version__, version, " ".join(flags), _cpu_signature()]
    key = _key([source, *signature, *(header or ())])
    cache = _cache_dir()
    target = cache / f"{stem}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if target.exists():  # built by another process while this one waited
            return target
        includes = [f"-I{jax.ffi.include_dir()}"]
        if header is not None:
            folder = _precompiled(cache, cxx, tuple(flags), header, tuple(signature))
            includes.insert(0, f"-I{folder}")
        # Built under a temporary name and renamed: a process that does not wait
        # for the lock (it has none, or the cache is shared over NFS) never loads
        # a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        src = pathlib.Path(tmp).with_suffix(".cc")
        objects = [f"{tmp}.{i}.o" for i in range(parts)] if parts > 1 else []
        try:
            src.write_text(source)
            if objects:
                _run_all(
                    [cxx, *flags, *includes, f"-DBYZJAX_PART={i}", "-c", str(src)]
                    + ["-o", obj]
                    for i, obj in enumerate(objects)
                )
                _run_all([[cxx, *flags, *objects, "-o", tmp]])
            else:
                _run_all([[cxx, *flags, *includes, str(src), "-o", tmp]])
            os.replace(tmp, target)
        finally:
            for leftover in (tmp, src, *objects):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return target


def _run_all(commands) -> None:
    """Runs the compiler commands at once and waits for all of them; the first
    that failed raises CalledProcessError with its output."""
    procs = [
        (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for cmd in commands
    ]
    done = [(cmd, proc, *proc.communicate()) for cmd, proc in procs]
    for cmd, proc, out, err in done:
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode,
                cmd,
                out.decode(errors="replace"),
                err.decode(errors="replace"),
            )


@contextlib.contextmanager
def _build_lock(target: pathlib.Path):
    """Holds an exclusive lock on `target`'s build: processes that need the same
    library (parallel test workers, a sweep's processes) wait for one compilation
    instead of each running their own (the kernels took 25 s alone on the 2-core
    Xeon, 33 s each with two at once)."""
    if fcntl is None:
        yield
        return
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _precompiled(
    cache: pathlib.Path,
    cxx: str,
    flags: tuple[str, ...],
    header: tuple[str, str],
    signature: tuple[str],
) -> pathlib.Path:
    """A directory in `cache` holding header (name, text) and, where the compiler
    makes one, its precompiled form for these flags (GCC reads `name.gch` in place
    of the header when the flags match, else the header itself); built once per
    process at most (a compiler that makes none is not asked again), under a
    temporary name as in `_build_shared`."""
    name, text = header
    folder = cache / f"header-{_key([name, text, *signature])}"
    done = folder / f"{name}.gch"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, folder / name)
    fd, tmp = tempfile.mkstemp(suffix=".gch", dir=folder)
    os.close(fd)
    compile_only = [flag for flag in flags if flag != "-shared"]
    cmd = [cxx, *compile_only, "-x", "c++-header", str(folder / name), "-o", tmp]
    try:
        # Without it (a compiler that makes none) the sources parse the header.
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            os.replace(tmp, done)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Builds, loads and registers the kernels once; None (with a warning) if not."""
    cxx = _compiler()
    if cxx is None or not hasattr(jax, "ffi"):
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(
            str(_build_shared(_SOURCE.read_text(), "kernels", parts=2))
        )
        for name, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as err:
        warn_unbuilt(
            "the CPU kernels could not be built; the distance rules use their "
            "slower pure-XLA forms.",
            err,
        )
        return None
    return lib


def warn_unbuilt(consequence: str, err: Exception) -> None:
    """A RuntimeWarning that a library could not be built: `consequence`, then the
    end of the compiler's output (or the error)."""
    detail = getattr(err, "stderr", "") or str(err)
    warnings.warn(
        f"byzjax: {consequence} {detail[-2000:]}", RuntimeWarning, stacklevel=3
    )
