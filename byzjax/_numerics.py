"""Shared numerics: written once, called by every rule and attack.

Non-finite policy (SPEC D18): a Byzantine row may hold NaN, +-Inf or 1e38. Distances,
scores and norms are computed in float32 at HIGHEST matmul precision (the DEFAULT
precision is TF32 on recent GPUs, about three significant digits); any NaN among them
becomes +Inf, so a broken row is never the closest or the smallest. For order statistics
NaN coordinates sort as +Inf, so with at most f such rows they are trimmed or ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from byzjax import _native
from byzjax._native import networks
from byzjax._rows import (
    column_block,
    compute_dtype,
    promoted_blocks,
    promoted_rows,
    promoted_take,
    promoted_tied,
    sum_rows,
    tied,
)
from byzjax._sorting import (
    FULL_NETWORK_MAX_N,
    NETWORK_MAX_N,
    SELECT_MAX_N,
    _nan_to_posinf,
    middle_ranks,
    order_statistics,
    ranked_rows,
    sort_rows,
    window_cuts,
    window_ends,
    written,
)

HIGHEST = lax.Precision.HIGHEST

# Dtypes of x that the CPU distance kernels read as they are (a bfloat16 row is
# widened as it is loaded, so no float32 copy of x is written).
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def kernel_rows(x: jax.Array) -> bool:
    """Whether the CPU distance kernels take x (float32 or bfloat16) as it is."""
    return bool(x.size) and _native.usable(x, dtypes=_KERNEL_DTYPES)


def promote(x: jax.Array) -> jax.Array:
    """x in `compute_dtype`: a whole-array copy for a bfloat16 x. Rules call it
    only on the paths that cannot read bfloat16 rows directly."""
    return x.astype(compute_dtype(x.dtype))


def kernel_input(x: jax.Array) -> jax.Array:
    """x as the distance routines read it: as it is where the CPU kernels take its
    dtype, promoted where they take only its promoted rows (float16), and as it is
    off the kernels, whose XLA forms convert rows inside their fused loops (a
    float32 copy of a bfloat16 x is twice its bytes: the memory target)."""
    on_kernels = bool(x.size) and _native.usable(x, dtypes=(x.dtype,))
    return promote(x) if on_kernels and not kernel_rows(x) else x


def nan_to_posinf(x: jax.Array) -> jax.Array:
    """Replaces NaN by +Inf (so NaN sorts last and is never a nearest neighbour)."""
    return _nan_to_posinf(x)


def patch_if(pred: jax.Array, fix, value: jax.Array, *operands) -> jax.Array:
    """`fix(value, *operands)` where the scalar `pred` holds, else `value`, with
    `fix` run only then.

    A `lax.while_loop` of at most one trip rather than a `lax.cond`: under
    `jax.vmap` (sweeps) a cond with a batched predicate becomes a select that runs
    both sides every time (18.5 against 8.5 ms for four (25, 2.5e5) inputs of
    mean-around-median), while the loop runs `fix` only when some batch element
    needs it. For a rare, costly fix of a cheap `value`, computed first. `fix`
    must take every traced array it depends on through `value` and `operands`:
    derivatives flow through those alone.

    Differentiable in both modes (the simulator's influence weights take a VJP
    through the rules, and a while loop cannot be transposed): its JVP runs `fix`
    and selects, so when differentiated the fix always runs, and its derivative
    must be finite where it is not taken (a NaN value there is harmless, an
    infinite derivative times the zero cotangent is not). A `lax.cond` there failed
    to transpose (a `stop_gradient` inside mean-around-median's fix).
    """
    return _patch_if(fix, pred, value, *operands)


def materialized(values: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """values written out for their consumers, in a value-only form (a while loop
    cannot be transposed): the carry of a `lax.while_loop` that runs no trip (one
    where the first entry of values[0] is NaN, which changes nothing). XLA:CPU
    removes `lax.optimization_barrier` before it fuses, duplicates a network into
    each consumer, and hoists a carry its loop's body leaves as it is (and then
    the loop): the body's select, which it cannot see through, keeps the carry
    in. A reduction (`_sorting.written`) did not do: its fusion recomputed the
    network for every row."""
    if values[0].size == 0:
        return values
    trips = jnp.isnan(values[0].ravel()[0]).astype(jnp.int32)

    def body(carry):
        i, *vs = carry
        keep = i >= 0
        return (i + 1, *[jnp.where(keep, v, -v) for v in vs])

    _, *out = lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), *values))
    return tuple(out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _patch_if(fix, pred, value, *operands):
    def body(carry):
        # The operands tied to the loop's state: XLA hoists a body that does not
        # depend on it out of the loop, which then ran the fix every time.
        pred, value = carry
        ops, _ = lax.optimization_barrier((operands, pred))
        return jnp.zeros_like(pred), fix(value, *ops)

    return lax.while_loop(lambda carry: carry[0], body, (pred, value))[1]


@_patch_if.defjvp
def _patch_if_jvp(fix, primals, tangents):
    pred, value, *operands = primals
    _, value_dot, *operands_dot = tangents
    fixed, fixed_dot = jax.jvp(fix, (value, *operands), (value_dot, *operands_dot))
    return jnp.where(pred, fixed, value), jnp.where(pred, fixed_dot, value_dot)


def lazy_cond(pred: jax.Array, true_fn, false_fn, *operands) -> jax.Array:
    """`lax.cond(pred, true_fn, false_fn, *operands)` as two `patch_if` loops: one
    side runs, as with a cond, and under `jax.vmap` each side runs only when some
    input of the batch takes it (a cond there runs both on every call)."""
    shape = jax.eval_shape(false_fn, *operands)
    out = jnp.zeros(shape.shape, shape.dtype)
    out = patch_if(~pred, lambda _, *ops: false_fn(*ops), out, *operands)
    return patch_if(pred, lambda _, *ops: true_fn(*ops), out, *operands)


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over the worker axis 0 of an (n, d) array, as a tree of row additions.

    On XLA:CPU `x.mean(axis=0)` over (25, 1e6) float32 took 372 ms where adding the
    rows took 11 ms: the reduction over the leading (strided) axis is lowered badly,
    while the row additions fuse into one elementwise loop that reads `x` once. A
    pairwise tree keeps the float rounding at O(log n).
    """
    return map_rows_sum(lambda row: row, x)


def map_rows_sum(fn, x: jax.Array, tie: tuple[jax.Array, ...] = ()) -> jax.Array:
    """sum_i fn(x_i) over the rows of an (n, d) array, fused into one pass.

    Apply elementwise work row by row through this rather than to the whole array
    before `row_sum`: XLA:CPU materialises a whole-array temporary that is then
    sliced into rows (sign votes over (25, 1e6) took 100 ms that way, against a read
    floor of 7 ms). The rows are promoted to `compute_dtype` first (`tie`: as in
    `promoted_rows`).
    """
    rows = promoted_rows(x, tie=tie)
    return sum_rows(lambda i: fn(rows[i]), x.shape[0])


def stack_rows(row, n: int) -> jax.Array:
    """jnp.stack([row(0), ..., row(n - 1)]): an (n, d) result built row by row.

    A rule that reads its input row by row (`map_rows_sum`, the sorting networks)
    then fuses with the rows' computation; the same computation written on the whole
    array is materialised first (clipping + mean over (25, 1e6): 76 ms as a whole-array
    scale, 18 ms row by row; a fresh 100 MB buffer alone costs ~50 ms of page faults
    here).
    """
    return jnp.stack([row(i) for i in range(n)])


def write_rows(x: jax.Array) -> jax.Array:
    """x, computed row by row (`stack_rows`), written out once as one array.

    For a consumer that reads it from memory (the CPU kernels). XLA:CPU fuses a
    concatenation with the rows' computation up to 8 rows; above, it wrote each
    row to a buffer of its own and then copied them all (clipping + Krum at
    (25, 1e6): 196 MB of temporaries, 113 ms). Groups of 4 rows updated in place
    into one array: 100 MB, 58 ms (25.3 against 29.9 ms with the malloc
    tunables; groups of 8 took 80 ms, single rows 60 ms).
    """
    out = jnp.zeros_like(x)
    for start in range(0, x.shape[0], 4):
        out = lax.dynamic_update_slice(out, x[start : start + 4], (start, 0))
    return out


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x[idx] in `compute_dtype`, for a static number of traced row indices, built
    row by row.

    Consumers that read rows (sorting networks, `sum_rows`) fuse the dynamic row
    reads instead of a (k, d) gathered copy.
    """
    return jnp.stack(taken_rows(x, idx))


def taken_rows(x: jax.Array, idx: jax.Array) -> list[jax.Array]:
    """[x[idx[0]], x[idx[1]], ...] in `compute_dtype`, one take for all of them:
    bfloat16 rows are promoted in groups chained from one barrier (separate takes
    each barriered x alike, the barriers were merged, and XLA converted x whole)."""
    return promoted_take(
        x,
        lambda group, j: lax.dynamic_index_in_dim(group, idx[j], keepdims=False),
        idx.shape[0],
    )


def weighted_row_sum(w: jax.Array, x: jax.Array, keep: jax.Array) -> jax.Array:
    """sum_i w_i x_i over the rows with keep_i; a dropped row adds exactly 0.

    Through the CPU kernels in one read of x whatever keep is (`step_sq_dists`,
    a row of weight 0 skipped, the zero centre not read): alternated in one
    process on the Zen 4 (session 34), 0.97-1.02 the time of XLA's product
    `w @ x` at (25 | 100, 1e6) float32. It was `lax.cond(all(keep), product,
    rows)`, which `jax.vmap` (sweeps) turns into a select of both sides: centered
    clipping at (25, 1e6) vmapped over 4 inputs took 1.46x their calls one by
    one (three reads for two). Off the kernels the cond stays: a product where
    every row is kept (XLA:CPU's fused row additions read n streams at once: at
    (100, 1e6) 36 ms against 14), else the kept rows added one by one, since a
    product would turn 0 * Inf into NaN. Kept rows must be finite.
    """

    def dropped():
        # Tied to w: in a loop (the geometric median's steps) the rows'
        # conversions would be hoisted out of it and written out.
        x_rows = promoted_rows(x, tie=(w,))
        return sum_rows(lambda i: jnp.where(keep[i], w[i] * x_rows[i], 0.0), x.shape[0])

    if kernel_rows(x):
        kept = jnp.where(keep, w, 0.0).astype(jnp.float32)
        no_centre = jnp.zeros((0,), jnp.float32)  # zeros, not read
        return _native.step_sq_dists(x, no_centre, kept, False)[0]
    if x.dtype != compute_dtype(x.dtype):
        # A product would read a float32 copy of a bfloat16 x.
        return dropped()
    return lax.cond(jnp.all(keep), lambda: jnp.matmul(w, x, precision=HIGHEST), dropped)


def row_mean(x: jax.Array) -> jax.Array:
    """Mean over the worker axis 0 (see `row_sum` for why not `x.mean(0)`)."""
    return row_sum(x) / x.shape[0]


def dot_mean(x: jax.Array) -> jax.Array:
    """Mean over the worker axis 0 as one matrix-vector product, materialised.

    Use it where the mean is broadcast back over rows (an attack's shared vector sent
    by f workers): XLA fuses the row additions of `row_mean` into each broadcast row
    and recomputes the whole sum f times (IPM at (76, 1e6) -> (24, 1e6) took 520 ms
    that way, 86 ms through the product). A dot is never fused into its consumers.
    Use `row_mean` where the rows are themselves computed (it fuses with them).
    On the CPU, stored rows go through the kernels in one read: float32 through
    the mean's (IPM at (20, 1e6) 12.1 -> 8.3 ms, 0.41 -> 0.72 of the read floor;
    at (76, 1e6) 0.63 -> 0.89 of it), bfloat16 through the moments kernel, which
    widens them as it reads into a float32 mean (the product would read a
    float32 copy of x, written first).
    """
    if kernel_rows(x):
        if x.dtype == jnp.float32:
            return _native.row_rule(x, _native.MEAN)
        return _native.row_moments(x)[0]
    if x.dtype != compute_dtype(x.dtype):
        # A product would read a float32 copy of the rows: their fused sum instead,
        # materialised by the barrier (which no consumer fuses through either).
        return lax.optimization_barrier(row_mean(x))
    ones = jnp.full(x.shape[0], 1.0 / x.shape[0], x.dtype)
    return jnp.matmul(ones, x, precision=HIGHEST)


def mean_std(x: jax.Array, ddof: int) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and standard deviation over the worker axis (ALIE's
    mu and sigma, and its predictor among the simulator's diagnostics).

    Through the moments kernel where it can (one read of x, float32 sums); else
    the mean as a product and the deviations as XLA's fused sum (two reads or
    more)."""
    if kernel_rows(x):
        mu, m2 = _native.row_moments(x)
    else:
        mu = dot_mean(x)
        # Tied to mu: else the rows' conversions are shared with the mean's
        # and written out.
        m2 = map_rows_sum(lambda r: jnp.square(r - mu), x, tie=(mu,))
    return mu, jnp.sqrt(m2 / (x.shape[0] - ddof))


def sort_workers(x: jax.Array) -> jax.Array:
    """Sorts each coordinate of an (n, d) array over the worker axis, NaN as +Inf."""
    return sort_rows(x)


def sq_norms(x: jax.Array) -> jax.Array:
    """Squared Euclidean norms of the rows of an (n, d) array; non-finite -> +Inf.

    Through the row kernel where it can (a bfloat16 x without a float32 copy): XLA's
    reduction read x 2.1-2.6 times at (25 | 100, 1e6) float32 (the 2-core Xeon of
    family 6 model 167)."""
    if kernel_rows(x):
        return nan_to_posinf(_native.row_sq_norms(x))
    return _sq_norms(x)


@jax.custom_jvp
def _sq_norms(x: jax.Array) -> jax.Array:
    # Promoted inside the reduction, which XLA fuses: no float32 copy of x.
    x = promote(x)
    return nan_to_posinf(jnp.einsum("nd,nd->n", x, x, precision=HIGHEST))


@_sq_norms.defjvp
def _sq_norms_jvp(primals, tangents):
    # A non-finite entry contributes no derivative, as in the kernels' rules
    # (`_native._finite`): its 0 * Inf would make the reverse pass NaN.
    (x,), (t,) = primals, tangents
    finite = promote(jnp.where(jnp.isfinite(x), x, 0.0))
    tangent = 2.0 * jnp.einsum("nd,nd->n", finite, promote(t), precision=HIGHEST)
    return _sq_norms(x), tangent


def norms(x: jax.Array) -> jax.Array:
    """Euclidean norms of the rows of an (n, d) array; non-finite -> +Inf."""
    return root(sq_norms(x))


@jax.custom_jvp
def root(sq: jax.Array) -> jax.Array:
    """sqrt(sq) of squared norms or distances, whose derivative is taken as 0 at
    0 and at +-Inf or NaN, where sqrt's is infinite or NaN: multiplied by a zero
    cotangent (a row a `where` leaves out: the zero and non-finite rows of the
    nan, inf and zero attacks), those turn a reverse pass NaN."""
    return jnp.sqrt(sq)


@root.defjvp
def _root_jvp(primals, tangents):
    (sq,), (t,) = primals, tangents
    out = jnp.sqrt(sq)
    smooth = (sq > 0) & jnp.isfinite(sq)
    return out, jnp.where(smooth, t / (2.0 * jnp.where(smooth, out, 1.0)), 0.0)


def pairwise_sq_dists(x: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """Squared Euclidean distances D_ij = ||x_i - x_j||^2, (n, n), NaN as +Inf.

    On the CPU in float32, the `_native` kernel sums the squared differences
    directly: no Gram matrix, so no cancellation and no use for `center` (XLA then
    drops its computation). At (25, 1e6) it took 11-14 ms against 45-60 ms for the
    blocked Gram matrix plus the centre. Elsewhere (GPUs, other dtypes)
    D_ij = G_ii + G_jj - 2 G_ij with G = (x - c)(x - c)^T in float32 at HIGHEST
    precision; subtracting a centre c close to the rows first reduces cancellation,
    and negative round-off is clamped to 0. The diagonal is exactly 0 either way,
    and NaN (from inf - inf when a row overflows) becomes +Inf.

    Args:
      x: (n, d) array.
      center: optional (d,) vector subtracted from every row in the Gram form; pass a
        robust one (for example `robust_center`) so that a 1e38 row cannot spoil it.

    Returns:
      (n, n) float32 (or wider) array of squared distances.
    """
    x = kernel_input(x)
    if kernel_rows(x):
        return nan_to_posinf(_native.pairwise_sq_dists(x))
    return gram_sq_dists(x, center)


def gram_sq_dists(x: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """The Gram-matrix form of `pairwise_sq_dists` (pure XLA, every backend)."""
    dtype = compute_dtype(x.dtype)
    if center is None:
        center = jnp.zeros(x.shape[1], dtype)
    gram = centered_gram(x, center.astype(dtype))
    sq = jnp.diagonal(gram)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist = jnp.maximum(nan_to_posinf(dist), 0.0)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, dist)


def row_sq_dists(x: jax.Array, v: jax.Array) -> jax.Array:
    """||x_i - v||^2 for every row of an (n, d) array, NaN as +Inf.

    One whole-array reduction (XLA:CPU copies every row slice handed to a separate
    reduction: 53 ms against 12 ms at (25, 1e6)); on the CPU in float32 the
    `_native` kernel instead, since XLA re-reads v for every row (at (100, 1e6)
    60-85 ms, the kernel 25-35 ms, one read of x taking 17 ms).
    """
    x = kernel_input(x)
    if kernel_rows(x) and v.dtype == jnp.float32:
        return nan_to_posinf(_native.row_sq_dists(x, v))
    return reduce_row_sq_dists(x, v)


def reduce_row_sq_dists(x: jax.Array, v: jax.Array) -> jax.Array:
    """The pure-XLA form of `row_sq_dists`: one whole-array reduction, the rows
    promoted inside it."""
    diff = promoted_tied(x, v) - v
    return nan_to_posinf(jnp.einsum("nd,nd->n", diff, diff, precision=HIGHEST))


def row_dots(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w, (n,), for a (d,) vector w in `compute_dtype`, at HIGHEST precision.

    A matrix-vector product where x is in `compute_dtype`; else a fused reduction
    over the promoted rows, since XLA:CPU writes a product's converted operand out
    (a float32 copy of a bfloat16 x, twice its bytes) and fuses a reduction's.
    """
    if x.dtype == compute_dtype(x.dtype):
        return jnp.matmul(x, w, precision=HIGHEST)
    return jnp.sum(promoted_tied(x, w) * w, axis=1)


def centered_gram(
    x: jax.Array, center: jax.Array, block: int | None = None
) -> jax.Array:
    """G = (x - c)(x - c)^T in `compute_dtype` at HIGHEST precision, summed over
    column blocks of x, each promoted and centred on its own: neither a centred
    nor a promoted copy of the whole of x is written (a product cannot fuse
    them, and either copy is x's bytes again or twice them).

    XLA:CPU is slow on this skinny product (n x n output, contraction over d):
    (25, 1e6) float32 took 194 ms as one matmul and 52 ms as a `fori_loop` over
    column blocks of 2,048 accumulating small Grams (100 rows: 480 ms and 214 ms
    with blocks of 8,192). Accelerators run a single product well, so their
    blocks are an eighth of the columns (`gram_block`).

    Args:
      x: (n, d) array.
      center: (d,) vector in `compute_dtype`.
      block: columns per block; by default `gram_block` for this backend.
    """
    n, d = x.shape
    if block is None:
        block = gram_block(n, d, jax.default_backend())

    def gram_of(xb, cb):
        xb = promote(xb) - cb
        return jnp.matmul(xb, xb.T, precision=HIGHEST)

    if block >= d:
        return gram_of(x, center)
    count = d // block

    def add_block(i, acc):
        xb = lax.dynamic_slice_in_dim(tied(x, i), i * block, block, axis=1)
        return acc + gram_of(xb, lax.dynamic_slice_in_dim(center, i * block, block))

    zero = jnp.zeros((n, n), center.dtype)
    gram = lax.fori_loop(0, count, add_block, zero)
    if count * block == d:
        return gram
    return gram + gram_of(x[:, count * block :], center[count * block :])


def gram_block(n: int, d: int, backend: str) -> int:
    """Columns per block of `centered_gram`: on the CPU 2,048 up to 32 rows and
    8,192 above (whole below two blocks); elsewhere `column_block`'s eighth of
    d, each product still large."""
    cpu_block = 2048 if n <= 32 else 8192
    block = column_block(d, cpu_block, backend)
    return d if backend == "cpu" and d < 2 * block else block


def smallest_k(keys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of the last axis and their indices, ties to lowest index.

    `lax.top_k` returns the lower index first among equal values (SPEC T0), so it is
    applied to the negated keys.
    """
    values, index = lax.top_k(-keys, k)
    return -values, index


def _network_kernel(
    x: jax.Array,
    dtypes=(jnp.float32, jnp.bfloat16),
    max_n=FULL_NETWORK_MAX_N,
    n: int | None = None,
) -> bool:
    """Whether a rule over n stored rows of x (all of them by default) runs its
    network as a generated CPU loop (`byzjax._native.networks`): n <= `max_n`, on
    the CPU."""
    return (
        1 < (x.shape[0] if n is None else n) <= max_n
        and bool(x.size)
        and _native.usable(x, dtypes=dtypes)
        and networks.supported()
    )


def _selection_kernel(x: jax.Array, n: int | None = None) -> bool:
    """Whether the median, trimmed mean or mean around the median of n stored
    rows of x (all of them by default) runs as a generated loop: up to
    `NETWORK_MAX_N` rows."""
    return _network_kernel(x, max_n=NETWORK_MAX_N, n=n)


def differentiated_as(fn, form, x: jax.Array, *rest) -> jax.Array:
    """`fn(x, *rest)`, differentiated in x as `form(x, *rest)`: a function with
    the same values near x (the same selection of rows), for a fast form whose
    own derivative cannot be taken (a CPU loop) or is costly (a network's
    wires, see `_sorting._wires`)."""
    rule = jax.custom_jvp(fn)
    rule.defjvp(
        lambda primals, tangents: (
            fn(*primals),
            jax.jvp(lambda x: form(x, *primals[1:]), primals[:1], tangents[:1])[1],
        )
    )
    return rule(x, *rest)


def _through_network(
    x: jax.Array, source: str, form, idx: jax.Array | None = None
) -> jax.Array:
    """The generated loop `source` over the rows of x, or over x[idx], differentiated
    as `form(x)`, or `form(x, idx)` (`differentiated_as`)."""
    rest = () if idx is None else (idx,)
    return differentiated_as(
        lambda x, *rest: networks.network_rule(x, source, *rest), form, x, *rest
    )


def mean_around_median_of(x: jax.Array, idx: jax.Array, k: int) -> jax.Array:
    """`coordinate_mean_around(y, coordinate_median(y), k)` over the rows y = x[idx]
    (m static, traced indices), the general form's bits. Where the CPU runs the
    loops, one loop reads the m rows where they lie in x: no gathered copy
    (Bulyan's coordinate stage)."""
    m = idx.shape[0]

    def xla_form(x, idx):
        y = take_rows(x, idx)
        return coordinate_mean_around(y, coordinate_median(y), k)

    def form(x, idx):
        return _mean_around_selected(take_rows(x, idx), k)

    if not _selection_kernel(x, m):
        return differentiated_as(xla_form, form, x, idx)
    source = networks.mean_around_median_source(m, k, x.dtype.type)
    return _through_network(x, source, form, idx)


def coordinate_median(x: jax.Array, *, stored: bool = False) -> jax.Array:
    """Coordinate-wise median over the worker axis, NaN as +Inf.

    Odd n: the middle order statistic; even n: the average of the two middle ones
    (numpy's convention, SPEC D4). `stored`: x is read from memory (not computed
    in the same program), so the network may run as a generated CPU loop, which
    prefetches the rows XLA's fused loop streams without.
    """
    n = x.shape[0]
    if stored and _selection_kernel(x):
        source = networks.median_source(n, x.dtype.type)
        return _through_network(x, source, coordinate_median)
    if n % 2:
        return order_statistics(x, [n // 2])[0]
    lo, hi = order_statistics(x, middle_ranks(n))
    return 0.5 * (lo + hi)


def ranks_with_copies(honest: jax.Array, copies: int, ranks: Sequence[int]):
    """The order statistics `ranks` (0-based, NaN as +Inf) of `copies` rows that
    all hold u followed by the rows of `honest` (h, d), as a function of u (d,)
    that returns (u in `compute_dtype`, NaN as +Inf; the ranks): the honest order
    statistics they can take are found once (one network pruned to those ranks),
    then each rank costs two clips of a row.

    With s_0 <= ... <= s_(h-1) a column's honest values and u put in `copies`
    times, rank r of the h + copies values is clip(u, s_(r-copies), s_r), an end
    missing below rank 0 or above h - 1: s_r where u is above it, s_(r-copies)
    where u is below that, else u. These are the same values as a network's
    ranks of the stacked rows, up to the signs of zeros (which XLA's select
    networks leave to the wires' order).
    """
    h = honest.shape[0]
    needed = sorted({k for r in ranks for k in (r - copies, r) if 0 <= k < h})
    found = order_statistics(honest, needed) if needed else []
    stats = dict(zip(needed, found, strict=True))
    dtype = compute_dtype(honest.dtype)

    def rank(u, r):
        if r - copies in stats:
            u = jnp.maximum(u, stats[r - copies])
        return jnp.minimum(u, stats[r]) if r in stats else u

    def evaluate(u):
        u = _nan_to_posinf(u.astype(dtype))
        return u, [rank(u, r) for r in ranks]

    return evaluate


def median_with_copies(honest: jax.Array, copies: int):
    """`coordinate_median` of `copies` rows that all hold u followed by the rows
    of `honest`, as a function of u: off `ranks_with_copies` (at most four
    honest ranks once, then two clips of a row per u)."""
    middle = ranks_with_copies(honest, copies, middle_ranks(honest.shape[0] + copies))

    def evaluate(u):
        _, (lo, *hi) = middle(u)
        return 0.5 * (lo + hi[0]) if hi else lo

    return evaluate


def trimmed_mean_with_copies(honest: jax.Array, copies: int, b: int):
    """`coordinate_trimmed_mean(x, b)` of `copies` rows that all hold u followed
    by the rows of `honest`, as a function of u, where x has more than
    `FULL_NETWORK_MAX_N` rows (and b >= 1): the clip form's two order
    statistics off `ranks_with_copies`, then its clipped rows summed as it sums
    them, so its values (one pass over the honest rows per u instead of a
    network over all the rows). None for fewer rows, where the form sums a
    partition network's middle wires in an order these ranks do not give.
    """
    h = honest.shape[0]
    n = h + copies
    if b == 0 or n <= FULL_NETWORK_MAX_N:
        return None
    cuts = ranks_with_copies(honest, copies, (b, n - b - 1))
    rows = promoted_rows(honest)

    def evaluate(u):
        u, (lo, hi) = cuts(u)
        u = jnp.clip(u, lo, hi)
        clipped = [u] * copies + [jnp.clip(_nan_to_posinf(r), lo, hi) for r in rows]
        return (sum_rows(lambda i: clipped[i], n) - b * (lo + hi)) / (n - 2 * b)

    return evaluate


def coordinate_trimmed_mean(x: jax.Array, b: int, *, stored: bool = False) -> jax.Array:
    """Mean of the order statistics b+1 .. n-b of each coordinate (NaN as +Inf).

    Up to `FULL_NETWORK_MAX_N` rows, the middle ranks are summed straight off the
    network, in its fused loop; the sum needs the middle set, not its order, so
    the network is Batcher's minus the compare-exchanges that only order values
    within the b smallest, the middle or the b largest (`partition_pairs`: 117 of 140
    at n = 25, b = 5; 4.2-4.3 against 5.0-5.2 ms at (25, 1e6), alternated).
    Above, with lo = x_(b+1) and hi = x_(n-b), clipping every entry to [lo, hi]
    maps the b smallest to lo and the b largest to hi and leaves the middle alone,
    so sum_k clip(x_k) - b (lo + hi) is the trimmed sum whatever the ties: two
    order statistics from a select network and one fused pass over x, instead of
    a full sort (the form the rule-aware attacks evaluate candidates on:
    `trimmed_mean_with_copies`). `stored`: as in `coordinate_median`, but the
    loop sums the middle ranks above 32 rows too: `_middle_mean`'s bits
    (`networks.trimmed_mean_source`).
    """
    n = x.shape[0]
    if b == 0:
        return row_mean(x)
    clipped = functools.partial(_clipped_mean, b=b)
    selected = functools.partial(_trimmed_mean_selected, b=b)
    if stored and _selection_kernel(x):
        source = networks.trimmed_mean_source(n, b, x.dtype.type)
        return _through_network(x, source, selected)
    if n > FULL_NETWORK_MAX_N:
        return differentiated_as(clipped, selected, x)
    # The middle ranks summed inside the network's fused loop: one read of x
    # instead of two (network, then clipping pass), 10-25 % faster at n = 25 and
    # 32 though the network keeps more compare-exchanges.
    return differentiated_as(functools.partial(_middle_mean, b=b), selected, x)


def _trimmed_mean_selected(x: jax.Array, b: int) -> jax.Array:
    """`coordinate_trimmed_mean(x, b)` for its derivative: the rows between the
    two order statistics lo = x_(b+1) and hi = x_(n-b), 1/(n - 2b) each, and the
    rows equal to lo or to hi sharing the middle ranks that hold their value
    equally (the wires' `_sorting._value_tangent`). The clipped form's own
    derivative wrote every row's clipping out and gathered them: 0.33 s a call at
    (100, 2e4)."""
    n = x.shape[0]
    v = _selecting_values(x)
    lo, hi = map(written, order_statistics(lax.stop_gradient(x), [b, n - b - 1]))
    at_lo, at_hi = v == lo, (v == hi) & (hi != lo)
    # Middle ranks holding lo: those from b up to its last rank (all of them
    # when lo == hi); holding hi (< lo's): those from its first rank to n - b - 1.
    lo_ranks = jnp.minimum(jnp.sum(v <= lo, axis=0), n - b) - b
    hi_ranks = n - b - jnp.sum(v < hi, axis=0)
    weights = (
        ((lo < v) & (v < hi))
        + at_lo * (lo_ranks / jnp.sum(at_lo, axis=0))
        # (No row is at hi apart from lo's where hi == lo.)
        + at_hi * (hi_ranks / jnp.maximum(jnp.sum(at_hi, axis=0), 1))
    )
    return _weighted_by(x, weights / (n - 2 * b))


def _selecting_values(x: jax.Array) -> jax.Array:
    """The values the order statistics of x compare (NaN as +Inf), in
    `compute_dtype`, with no derivative: they select, they are not summed."""
    return nan_to_posinf(promote(lax.stop_gradient(x)))


def _weighted_by(x: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i x_i over the rows of x (w of x's shape), the weights held as
    they are (no derivative flows through them), zero weights exact on a
    non-finite x."""
    w = lax.stop_gradient(weights)
    return jnp.sum(jnp.where(w != 0, w * promote(x), 0.0), axis=0)


def _middle_mean(x: jax.Array, b: int) -> jax.Array:
    n = x.shape[0]
    middle = ranked_rows(x, cuts=(b, n - b))[b : n - b]
    return sum_rows(lambda i: middle[i], n - 2 * b) / (n - 2 * b)


def _clipped_mean(x: jax.Array, b: int) -> jax.Array:
    n = x.shape[0]
    lo, hi = order_statistics(x, [b, n - b - 1])
    # Row by row, for the reason given in `order_statistics`.
    clipped = [jnp.clip(nan_to_posinf(r), lo, hi) for r in promoted_rows(x)]
    return (row_sum(jnp.stack(clipped)) - b * (lo + hi)) / (n - 2 * b)


def coordinate_mean_around(x: jax.Array, center: jax.Array, k: int) -> jax.Array:
    """Per coordinate, the mean of the k entries closest to `center` (ties T0).

    For each coordinate j the k workers with the smallest |x_ij - center_j| are
    averaged; equal deviations go to the lower worker index (SPEC T0), which a
    value-only sort cannot express (m - e and m + e tie but differ). NaN (and +-Inf)
    entries have deviation +Inf, so with at least k finite entries none is picked.
    Used by mean-around-median and by Bulyan's coordinate stage.

    With delta the k-th smallest deviation, every entry closer than delta is taken,
    and the entries at exactly delta are taken in worker order until k are: one
    order statistic and one fused pass over the rows, instead of an argsort.

    Args:
      x: (n, d) array.
      center: (d,) vector, usually the coordinate-wise median of `x`.
      k: static number of entries averaged per coordinate, 1 <= k <= n.

    Returns:
      (d,) array.
    """
    n = x.shape[0]
    rows = promoted_rows(x)
    dev = _deviations(rows, center)
    (delta,) = order_statistics(jnp.stack(dev), [k - 1], n <= SELECT_MAX_N)
    return _mean_within(rows, dev, delta, k)


def _deviations(rows: list[jax.Array], center: jax.Array) -> list[jax.Array]:
    # Row by row, for the reason given in `order_statistics`.
    return [nan_to_posinf(jnp.abs(r - center)) for r in rows]


def _mean_within(rows: list[jax.Array], dev: list[jax.Array], delta: jax.Array, k: int):
    """Mean of the k entries with the smallest deviations, delta the k-th of them:
    every entry closer than delta, then those at exactly delta in worker order
    (SPEC T0) until k are taken. One fused pass over the rows."""
    room = k - sum((d < delta).astype(jnp.int32) for d in dev)
    total = jnp.zeros_like(delta)
    for r, d in zip(rows, dev, strict=True):
        tie = (d == delta) & (room > 0)
        total = total + jnp.where((d < delta) | tie, r, 0.0)
        room = room - tie.astype(jnp.int32)
    return total / k


def coordinate_mean_around_median(
    x: jax.Array, k: int, *, stored: bool = False
) -> jax.Array:
    """`coordinate_mean_around(x, coordinate_median(x), k)`, in one network pass.

    In float32 with 2k >= n, up to `FULL_NETWORK_MAX_N` rows, the k entries
    closest to the median m form a window [s, s + k) of the sorted column r:
    since (r_(i+k) - m) - (m - r_i) grows with i, s counts the i with r_(i+k) -
    m < m - r_i. The window always holds the ranks [n - k, k), so its sum is
    those ranks (in any order: a partition network) plus the ends r_i,
    i < n - k, taken when i >= s, and r_i, i >= k, taken when i < s + k
    (`_window_mean`). A window is a set of values, not of workers: where an
    entry outside it is exactly as close to m as one inside with another
    value, SPEC T0 picks by worker index, and those columns (with a non-finite
    median's) are recomputed through the rows in worker order
    (`_mean_around_median_rows`), in gathered blocks of columns when few, else
    whole. Equal values tie at no cost (ALIE's f equal rows). bfloat16 has 8
    bits of mantissa: its columns tie too often for the window (Gaussian
    (25, 1e6): more than 16 blocks with a tie, 22.8 ms for the window and then
    the rows, against 16.3 ms for the rows alone), so it takes the general
    form, as 2k < n does. Bulyan keeps the general form
    (`mean_around_median_of`): on its rows a window took 50.8 against 19.7 ms at
    (25, 1e6).

    `stored`: as in `coordinate_median`: with 2k >= n, the window's loop, which
    settles its NaN columns itself in the steps that hold one, up to
    `NETWORK_MAX_N` rows, bfloat16 rows too (up to 32 rows the bits of this
    function on the rows widened to float32; above, and for bfloat16 rows,
    where XLA's form is the general one, the same values rounded otherwise);
    with 2k < n, the whole rule as one loop,
    `networks.mean_around_median_source`, the general form's bits, which
    `_mean_around_median_rows` gives too. Above 32 rows XLA keeps the general
    form: with the window's NaN columns fixed after it, the fix's second
    network compiled in 2.5 s more at n = 100, and a fix off the window's own
    delta, written out beside its mean, ran 126 against 14 ms at (128, 1e5).
    Differentiated as `_mean_around_selected`.
    """
    return differentiated_as(
        functools.partial(_mean_around_median_forms, k=k, stored=stored),
        functools.partial(_mean_around_selected, k=k),
        x,
    )


def _mean_around_median_forms(x: jax.Array, k: int, stored: bool) -> jax.Array:
    # Its values only: `coordinate_mean_around_median` differentiates it as
    # `_mean_around_selected`, so the loops run bare.
    n = x.shape[0]
    if stored and _selection_kernel(x):
        if 2 * k >= n:  # the loop settles the window's NaN columns itself
            source = networks.window_mean_source(n, k, x.dtype.type)
        else:
            source = networks.mean_around_median_source(n, k, x.dtype.type)
        return networks.network_rule(x, source)
    if n > FULL_NETWORK_MAX_N:
        # A bfloat16 input is promoted block by block: with its rows converted in
        # the fused loops, XLA:CPU took 4 min 15 s to compile (100, 1e6) (the
        # median network, then the deviations' network).
        return promoted_blocks(lambda x: _mean_around_own_median(x, k), x)
    if 2 * k >= n and x.dtype == jnp.float32:
        return _fix_columns(x, k, _window_mean(x, k))
    return _mean_around_median_rows(x, k)


def _mean_around_selected(x: jax.Array, k: int) -> jax.Array:
    """`coordinate_mean_around(x, coordinate_median(x), k)` for its derivative:
    the k entries of each coordinate closest to the median, held as selected
    (ties to the lower worker, SPEC T0), 1/k each. The median and the k-th
    deviation are `written` out: the reverse pass keeps the selection, and each
    row of it would otherwise compute its own networks (the gradient of
    mean-around-median over (40, 2000) took 2.7 s a call through them)."""
    n = x.shape[0]
    m = written(coordinate_median(lax.stop_gradient(x)))
    dev = nan_to_posinf(jnp.abs(_selecting_values(x) - m))
    (delta,) = order_statistics(dev, [k - 1], n <= SELECT_MAX_N)
    delta = written(delta)
    at = dev == delta
    room = k - jnp.sum(dev < delta, axis=0)
    # The ties before each row, in worker order.
    before = jnp.cumsum(at, axis=0) - at
    return _weighted_by(x, ((dev < delta) | (at & (before < room))) / k)


# `coordinate_mean_around_median` recomputes at most `_FIX_BLOCKS` blocks of
# `_FIX_BLOCK` columns by gathering them: finding the blocks among 1e6 columns
# took 0.16 ms (`_nan_blocks`), `jnp.nonzero` on per-column flags 7.5 ms.
_FIX_BLOCK, _FIX_BLOCKS = 1024, 16


def any_nan(v: jax.Array) -> jax.Array:
    """Whether v holds a NaN, as a scalar, from its sum: 0.13 ms over 1e6 entries
    against 0.35 ms for `jnp.isnan(v).any()` (a predicate array written, then
    reduced). XLA:CPU's max reduction does not propagate NaN. A sum is also NaN
    where v holds +Inf and -Inf, or overflows both ways: a fix run for nothing, by
    callers whose fix leaves correct entries as they are."""
    return jnp.isnan(jnp.sum(v))


def _nan_blocks(v: jax.Array, width: int) -> jax.Array:
    """`any_nan` of each block of `width` entries of v (the last one possibly
    shorter), from the blocks' sums in one reduce-window: 0.16 ms over 1e6 entries
    and no copy, where flags padded to whole blocks took 0.83 ms and the whole
    blocks sliced off the tail 0.28 ms and a 4 MB copy."""
    pad = -v.shape[0] % width
    sums = lax.reduce_window(v, 0.0, lax.add, (width,), (width,), [(0, pad)])
    return jnp.isnan(sums)


def _fix_columns(x: jax.Array, k: int, out: jax.Array) -> jax.Array:
    """`out` with its NaN columns recomputed in the T0 form: block by block, or
    whole when more than `_FIX_BLOCKS` blocks hold one. Only the NaN columns
    change, so a column's bits do not depend on its neighbours' ties (the CPU
    loop settles its ties column by column: `networks.window_mean_source`)."""
    d = out.shape[0]
    width = min(_FIX_BLOCK, d)
    count = -(-d // width)

    def gather(out, x, hit):
        # The blocks with a hit first (top_k puts the lower index first among
        # equal keys; the others recompute columns that were right): 0.09 ms
        # against 0.2 for `jnp.nonzero`.
        key = jnp.where(hit, count - jnp.arange(count), 0)
        blocks = lax.top_k(key, min(_FIX_BLOCKS, count))[1]
        starts = jnp.minimum(blocks * width, d - width)
        fixed = jax.vmap(
            lambda s0: _mean_around_median_rows(
                lax.dynamic_slice_in_dim(x, s0, width, axis=1), k
            )
        )(starts)

        def put(i, o):
            block = lax.dynamic_slice_in_dim(o, starts[i], width)
            block = jnp.where(jnp.isnan(block), fixed[i], block)
            return lax.dynamic_update_slice_in_dim(o, block, starts[i], 0)

        # Block by block in place: a scatter of the 16 blocks' columns took 0.2 ms
        # more.
        return lax.fori_loop(0, starts.shape[0], put, out)

    def fix(out, x):
        hit = _nan_blocks(out, width)
        # Under vmap this cond runs both sides, but only when some input has a
        # column to fix.
        return lax.cond(
            hit.sum() > _FIX_BLOCKS,
            lambda: jnp.where(jnp.isnan(out), _mean_around_median_rows(x, k), out),
            lambda: gather(out, x, hit),
        )

    return patch_if(any_nan(out), fix, out, x)


def _ranked_median(r: list[jax.Array]) -> jax.Array:
    """The median of a column from its network's wires r (wire j = rank j): the
    middle rank, or the mean of the two (SPEC D4)."""
    mid = middle_ranks(len(r))
    return r[mid[0]] if len(mid) == 1 else 0.5 * (r[mid[0]] + r[mid[1]])


def _window_mean(x: jax.Array, k: int) -> jax.Array:
    """The window's mean, NaN where a tie or a non-finite median makes the window
    possibly not SPEC T0's set (see `coordinate_mean_around_median`); 2k >= n.
    By min/max compare-exchanges above 32 rows (`ranked_rows`), as the CPU loop
    takes it there (`networks.window_mean_source`)."""
    n = x.shape[0]
    r = ranked_rows(x, cuts=window_cuts(n, k))
    m = _ranked_median(r)
    # i < s exactly when r_(i+k) - m < m - r_i (rounding keeps both sides
    # monotone in i), so the window holds r_(i+k) then, else r_i. Equality
    # between two values is the one tie the window cannot settle: at s, r_s is
    # in, r_(s+k) out, equally far, and T0 picks by worker index. Both sides are
    # >= 0 (r_i <= m <= r_(i+k)) and equal at 0 only for equal values, so the
    # ties' sum is > 0 exactly when there is one. (Below s the inequality is
    # strict; where float32 rounds two deviations of one side equal, the window
    # keeps the closer value, as the float64 oracle does.) Summing the selected
    # ends with the middle ranks as one tree, and the ties as a sum, took
    # 4.6-4.7 against 5.1-5.3 ms for a start count and a chain of or's.
    ends, ties = [], jnp.zeros_like(m)
    for i in range(n - k):
        up, down = r[i + k] - m, m - r[i]
        ends.append(jnp.where(up < down, r[i + k], r[i]))
        ties = ties + jnp.where(up == down, up, 0.0)
    window = [*r[n - k : k], *ends]
    total = sum_rows(lambda i: window[i], k)
    return jnp.where((ties > 0) | ~jnp.isfinite(m), jnp.nan, total / k)


# The most rows for which XLA:CPU's one loop over the network and the pass over
# the rows stays fast (`_mean_around_own_median`).
_FUSED_PASS_MAX_N = 104


def _mean_around_own_median(x: jax.Array, k: int) -> jax.Array:
    """`coordinate_mean_around(x, coordinate_median(x), k)` with the median m and
    the k-th smallest deviation delta off one network (`window_ends`), as the CPU
    loop has them (`networks.mean_around_median_source`), the same delta so the
    same bits: at (100, k = 76) 1,030 compare-exchanges against the 898 of the
    median's network and 890 of a second one over the deviations; XLA:CPU
    compiled it in 2.2-2.7 against 3.6-4.7 s, and ran it in 104 against 115
    ms."""
    n = x.shape[0]
    ranks = {*window_ends(n, k), *middle_ranks(n)}
    r = ranked_rows(x, cuts=[c for i in ranks for c in (i, i + 1)])
    m = _ranked_median(r)

    def deviation(v):
        return nan_to_posinf(jnp.abs(v - m))

    delta = functools.reduce(
        jnp.minimum,
        [
            jnp.maximum(deviation(r[a]), deviation(r[a + k - 1]))
            for a in range(n - k + 1)
        ],
    )
    # XLA:CPU compiles the network, delta and the pass over the rows to one loop
    # (it removes the barrier). Above 104 rows that loop recomputes the network
    # for their uses (kernels off, (n, 2e4) float32: 2.3 ms at n = 100, 2.5 at
    # 104, 4.6 at 108, 26 at 110, 33 at 112, 1,083 at 128), so there m and delta
    # are written out first (5.6, 5.8, 5.8, 5.5, 6.6 and 7.2 ms; at (128, 1e5)
    # 30 ms against 6.3 s).
    if n > _FUSED_PASS_MAX_N:
        m, delta = materialized((m, delta))
    else:
        m, delta = lax.optimization_barrier((m, delta))
    rows = promoted_rows(x)
    return _mean_within(rows, _deviations(rows, m), delta, k)


def _mean_around_median_rows(x: jax.Array, k: int) -> jax.Array:
    """The T0 form for n <= `FULL_NETWORK_MAX_N`: delta = max(m - r_s, r_(s+k-1) -
    m) off the sorted column, then the entries within delta taken from the rows in
    worker order (SPEC T0 at equal deviations) in the network's fused loop: one
    read of x instead of three (the median, the deviations' order statistic, the
    tie pass). A non-finite median takes the general form."""
    n = x.shape[0]
    r = ranked_rows(x)
    m = _ranked_median(r)
    start = jnp.zeros(m.shape, jnp.int32)
    for i in range(n - k):
        start = start + (r[i + k] - m < m - r[i]).astype(jnp.int32)
    lo = sum_rows(lambda j: jnp.where(start == j, r[j], 0.0), n - k + 1)
    hi = sum_rows(lambda j: jnp.where(start == j, r[j + k - 1], 0.0), n - k + 1)
    delta = jnp.maximum(m - lo, hi - m)
    rows = promoted_rows(x)
    out = _mean_within(rows, _deviations(rows, m), delta, k)
    # One consumer of the network (a second one would fuse its own copy of it).
    out = jnp.where(jnp.isfinite(m), out, jnp.nan)
    return patch_if(
        any_nan(out),
        lambda _, x: coordinate_mean_around(x, coordinate_median(x), k),
        out,
        x,
    )


def robust_center(x: jax.Array, f: int) -> jax.Array:
    """A centre for `pairwise_sq_dists`: the coordinate median of 2f + 1 rows.

    Any 2f + 1 rows hold at most f Byzantine ones, so their coordinate-wise median
    lies inside the honest range of every coordinate, which is all the centring
    needs (a 1e38 row cannot move it); a median over all n rows costs a sorting
    network over n rows (230 ms at (100, 1e6) on XLA:CPU, more than the Gram).
    """
    m = 2 * f + 1
    if m >= x.shape[0]:
        return coordinate_median(x)
    return order_statistics(x, [f], count=m)[0]
