"""Order statistics over the worker axis by sorting networks.

XLA:CPU's sort is a comparator loop: `jnp.median` over (25, 1e6) float32 took 2.5 s
here, `jnp.sort` 2.8 s. A sorting network is a fixed list of min/max
compare-exchanges between whole rows, i.e. elementwise ops that XLA fuses into one
loop reading the input once; asking only for the order statistics needed lets XLA
drop every comparator that does not feed them. Measured on 2 CPU cores with jax
0.10.2 (float32, d = 1e6): the median of 25 rows took 11.7 ms against a read floor of
8.7 ms; of 100 rows 121 ms against 20.6 ms. The network is Batcher's odd-even
merge sort, padded to a power of two with +Inf rows whose comparators are dropped
(a compare-exchange with a trailing +Inf is the identity).

Two traps, both measured: (1) each consumer of a network output would get its own
copy of the whole network fused in (a clip-and-sum over 25 rows took 400 ms instead
of 15 ms), so outputs are materialised with `lax.optimization_barrier`; (2) the
network has O(n log^2 n) comparators, so above `NETWORK_MAX_N` rows compile time
grows past a few seconds and `jnp.sort` takes over.

Derivatives are not taken through the compare-exchanges (`_wires`): the reverse
pass keeps every exchange's choice, XLA:CPU gave each of them its own copy of the
network, and the barrier did not prevent it (XLA:CPU removes barriers before it
fuses; a derivative's wires are `written` out instead).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from byzjax._rows import compute_dtype, promoted_rows, sum_rows

# Largest n sorted by a network: at n = 100 the median network compiled in 1.5 s.
NETWORK_MAX_N = 128
# Above this n a network is used only for a few order statistics: a full sort of 100
# rows by network took 120 s to compile, a median of 100 rows 1.5 s.
FULL_NETWORK_MAX_N = 32


# Above this n, networks over computed rows use min/max compare-exchanges (see
# `order_statistics`).
SELECT_MAX_N = 32

# A single column is sorted by XLA's sort: a network's compile time does not
# depend on d (the geometric median's median of 100 row norms took 1.7-1.9 s to
# compile as a network, 0.05 s as a sort), and a sort's slow comparator loop costs
# nothing over one column.
SORT_MAX_D = 1


@functools.cache
def batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (a, b), a < b, of Batcher's network for n inputs."""
    size = 1 << max(n - 1, 0).bit_length()
    out = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        out.append((a, b))
            k //= 2
        p *= 2
    return tuple(out)


@functools.cache
def partition_pairs(n: int, cuts: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Batcher's pairs for n inputs that still matter when the wires are read only
    as the sets between the sorted `cuts` (wires [0, c_1), [c_1, c_2), ...), not
    in their order within a set; a rank read on its own is a set of one.

    A compare-exchange that is the last one on both its wires and joins two wires
    of the same set only orders values within that set, so it is dropped; walking
    backwards, dropping one can make the one before it last on its wires. For the
    trimmed mean of 25 rows with b = 5 (cuts 5, 20): 117 of 140 compare-exchanges.
    """
    group = [sum(c <= w for c in cuts) for w in range(n)]
    kept, later = [], set()
    for a, c in reversed(batcher_pairs(n)):
        if a in later or c in later or group[a] != group[c]:
            kept.append((a, c))
            later.update((a, c))
    return tuple(reversed(kept))


def middle_ranks(n: int) -> tuple[int, ...]:
    """The 0-based ranks whose average is the median of n values (SPEC D4)."""
    return (n // 2,) if n % 2 else (n // 2 - 1, n // 2)


def window_ends(n: int, k: int) -> tuple[int, ...]:
    """The ranks at the ends of the windows of k consecutive ranks of n: below
    n - k + 1 and from k - 1 up. Over a sorted column s the deviations |s_j - m|
    from its median fall, then rise (rounding is monotone), so the k smallest
    are those of one window, and the k-th smallest is the least of the windows'
    larger ends: min over a of max(|s_a - m|, |s_(a+k-1) - m|)."""
    return tuple(sorted({*range(n - k + 1), *range(k - 1, n)}))


def window_cuts(n: int, k: int) -> tuple[int, ...]:
    """`partition_pairs` cuts for the mean around the median's window of k of n
    ranks (2k >= n): its possible ends and the median ranks each alone."""
    alone = {*range(n - k), *range(k, n), *middle_ranks(n)}
    return tuple(sorted({c for i in alone for c in (i, i + 1)}))


def _network(
    rows: list[jax.Array], select: bool, pairs: Sequence[tuple[int, int]] | None = None
) -> list[jax.Array]:
    rows = list(rows)
    for a, b in batcher_pairs(len(rows)) if pairs is None else pairs:
        if select:
            swap = rows[b] < rows[a]
            lo, hi = (
                jnp.where(swap, rows[b], rows[a]),
                jnp.where(swap, rows[a], rows[b]),
            )
        else:
            lo, hi = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
        rows[a], rows[b] = lo, hi
    return rows


def order_statistics(
    x: jax.Array, ks: Sequence[int], select: bool = True, count: int | None = None
) -> list[jax.Array]:
    """The order statistics x_(k+1) (0-based k) of each column of an (n, d) array.

    NaN sorts as +Inf (min/max would propagate it). The replacement is made row by
    row: on the whole array first, XLA materialised it and the median of 25 rows
    went from 17 ms to 75 ms.

    Args:
      x: (n, d) array (bfloat16 rows are promoted inside the network's loop).
      ks: static 0-based ranks, each in [0, n); ask only for those needed, the
      network is pruned to them.
      select: compare-exchange by one comparison and two selects (True) or by
        min/max. XLA's min/max propagate NaN (extra compares and blends per op)
        while the rows are NaN-free here: the median of 25 rows went from 17 to
        8.5 ms, of 100 rows from 168 to 80 ms. But a select network over more than
        `SELECT_MAX_N` rows that are themselves computed from another network
        (mean-around-median's deviations) took 99 s to compile; such callers pass
        False.
      count: the statistics of the first `count` rows only (all by default).

    Returns:
      One (d,) array per rank, in the order of `ks`.
    """
    n = x.shape[0] if count is None else count
    # Promoted rows are computed rows too (see `select`).
    select = select and (n <= SELECT_MAX_N or x.dtype == compute_dtype(x.dtype))
    few = n <= FULL_NETWORK_MAX_N or (n <= NETWORK_MAX_N and len(ks) <= 4)
    if few and x.shape[1] > SORT_MAX_D:
        ranked = _wires(x, n, select, None, tuple(ks))
    else:
        x = x[:n].astype(compute_dtype(x.dtype))
        ranked = tuple(jnp.sort(_nan_to_posinf(x), axis=0)[k] for k in ks)
    return list(lax.optimization_barrier(ranked))


def ranked_rows(x: jax.Array, cuts: Sequence[int] | None = None) -> list[jax.Array]:
    """Every wire of the network over the rows of x (wire k = rank k), NaN as +Inf.

    Not materialised: for a single consumer that reads several ranks in one fused
    loop. Ranks it does not read are pruned by XLA. With `cuts`, the wires hold
    the right sets of values between the cuts, in any order (`partition_pairs`),
    for a consumer that sums them (a rank read on its own needs cuts at k and
    k + 1). Without `cuts` (a full sort) for n <= `FULL_NETWORK_MAX_N` only
    (compile time); above it by min/max: a select network there did not fuse
    (the mean around the median's window ends at (100, 1e6): 25.7 s a call, 0.10
    s by min/max).
    """
    n = x.shape[0]
    if n > FULL_NETWORK_MAX_N and cuts is None:
        raise ValueError(f"ranked_rows: a full sort of n = {n} > {FULL_NETWORK_MAX_N}")
    pairs = None if cuts is None else partition_pairs(n, tuple(sorted(set(cuts))))
    return list(_wires(x, n, n <= FULL_NETWORK_MAX_N, pairs, tuple(range(n))))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _wires(
    x: jax.Array,
    n: int,
    select: bool,
    pairs: tuple[tuple[int, int], ...] | None,
    ks: tuple[int, ...],
) -> tuple[jax.Array, ...]:
    """The wires ks of the network `pairs` (Batcher's by default) over the first
    n rows of x, NaN as +Inf.

    Differentiated by `_value_tangent`, not through the network: the reverse pass
    of a select network keeps each compare-exchange's choice, and XLA:CPU fused
    the network's prefix into each of them, so programs ran for minutes (the gradient
    of the median of (36, 5000) took 21.8 s a call, of (40, 5000) more than 280 s;
    of the trimmed mean of (25, 2000), b = 5, 5.3 s)."""
    rows = [_nan_to_posinf(r) for r in promoted_rows(x, n)]
    wires = _network(rows, select, pairs)
    return tuple(wires[k] for k in ks)


@_wires.defjvp
def _wires_jvp(n, select, pairs, ks, primals, tangents):
    (x,), (t,) = primals, tangents
    wires = tuple(map(written, _wires(x, n, select, pairs, ks)))
    return wires, tuple(_value_tangent(x, t, n, w) for w in wires)


def _value_tangent(x: jax.Array, t: jax.Array, n: int, w: jax.Array) -> jax.Array:
    """A wire's tangent: the mean of the tangents t_i of the rows i whose value
    is w. Where the values differ, the tangent of the one row the wire holds, as
    through the network; where m rows tie, each counts 1/m (the network would
    give one of them all of it, by its comparators' order), so equal rows get
    equal derivatives and a sum of wires keeps the rows'. w written out
    (`written`): each consumer of the comparisons (the sum, the count, the
    reverse pass) would otherwise compute its own network. The comparisons on
    the whole of x (row by row, each row's cotangent took its own pass: 1.8 s at
    (100, 1e5) for the median's two wires), the sums row by row (over axis 0:
    47 against 15 ms at (25, 1e5), 206 against 85 ms at (40, 1e5))."""
    dtype = w.dtype
    hits = _nan_to_posinf(x[:n].astype(dtype)) == w
    taken = jnp.where(hits, t[:n].astype(dtype), 0.0)
    count = written(sum_rows(lambda i: hits[i].astype(dtype), n))
    return sum_rows(lambda i: taken[i], n) / count


def written(a: jax.Array) -> jax.Array:
    """a, written out once for its consumers. XLA:CPU fuses an elementwise
    producer into each of its consumers, a network too, and removes
    `lax.optimization_barrier` before it fuses; it does not fuse a reduction
    into its consumers. So: the larger of two broadcast copies of a (the network
    computed twice a column, once in all), on a's bits as integers. As floats,
    XLA:CPU took the reduction into a YNNPACK fusion with the comparisons that
    read a, which then computed the network for every row: the median's gradient
    at (25 | 40 | 100, 1e5) took 14.7 | 85 | 760 ms, on the bits 3.5 | 18 | 132
    ms."""
    bits = lax.bitcast_convert_type(a, jnp.dtype(f"int{8 * a.dtype.itemsize}"))
    copies = jnp.broadcast_to(bits, (2, *bits.shape))
    return lax.bitcast_convert_type(jnp.max(copies, axis=0), a.dtype)


def sort_rows(x: jax.Array) -> jax.Array:
    """All order statistics: x sorted along axis 0, NaN as +Inf."""
    return jnp.stack(order_statistics(x, range(x.shape[0])))


def _nan_to_posinf(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(x), jnp.inf, x)
