"""Minimum-diameter averaging (MDA), SPEC 1.9: brute force over all subsets.

Every subset of n - f workers is enumerated in a static index table built with numpy
when the rule is traced (itertools order, so ties go to the first subset, as in
Garfield and ByzFL), and all diameters are evaluated as one vectorised gather from
the n x n distance matrix, in chunks to bound memory. The number of subsets C(n, f)
explodes quickly (C(25, 6) = 177,100 but C(50, 12) ~ 1.2e11), so the rule refuses
configurations above a budget instead of compiling forever.

References:
  El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault. "Genuinely Distributed Byzantine
  Machine Learning", PODC 2020, arXiv:1905.03853.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from byzjax._checks import require, static_int
from byzjax._numerics import pairwise_sq_dists, robust_center, row_mean, take_rows
from byzjax.aggregators._base import Aggregator, stateless

# Subsets scored per chunk: chunk * (n - f)^2 gathered distances stay near 4M floats.
_CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=16)
def subset_table(n: int, size: int) -> np.ndarray:
    """All `size`-subsets of range(n) in itertools.combinations order, (C, size)."""
    dtype = np.int16 if n <= np.iinfo(np.int16).max else np.int32
    count = math.comb(n, size)
    flat = itertools.chain.from_iterable(itertools.combinations(range(n), size))
    table = np.fromiter(flat, dtype=dtype, count=count * size).reshape(count, size)
    table.setflags(write=False)
    return table


def mda(f: int = 0, *, max_subsets: int = 2_000_000) -> Aggregator:
    """Minimum-diameter averaging: the mean of the tightest subset of n - f inputs.

    S* = argmin_{|S| = n - f} max_{i, j in S} ||x_i - x_j||, MDA(X) = mean(x_{S*}).
    Ties go to the first subset in lexicographic order; a subset containing a
    non-finite distance has diameter +Inf, so it is never chosen while a finite one
    exists. The selected rows are gathered and averaged.

    Args:
      f: number of Byzantine workers tolerated.
      max_subsets: static budget on C(n, f), the number of subsets enumerated (the
        cost is O(C(n, f) (n - f)^2) plus a C(n, f) x (n - f) constant table).

    Returns:
      A stateless Aggregator.

    Raises:
      ValueError: when traced with n < 2f + 1 or C(n, f) > max_subsets.

    References:
      El Mhamdi et al., PODC 2020, arXiv:1905.03853.
    """
    f = static_int(f, "mda", "f")
    max_subsets = static_int(max_subsets, "mda", "max_subsets", minimum=1)

    def fn(x, params):
        n = x.shape[0]
        require(n >= 2 * f + 1, "mda", "n >= 2f + 1", n=n, f=f)
        count = math.comb(n, f)
        require(
            count <= max_subsets,
            "mda",
            f"C(n, f) <= max_subsets = {max_subsets} (raise max_subsets to allow it)",
            n=n,
            f=f,
            **{"C(n, f)": count},
        )
        size = n - f
        table = subset_table(n, size)
        dist = pairwise_sq_dists(x, center=robust_center(x, f))
        diam = _diameters(dist, table)
        best = jnp.argmin(diam)
        return row_mean(take_rows(x, jnp.asarray(table)[best].astype(jnp.int32)))

    return stateless(fn, promote=False, stored=True)


def _diameters(dist, table: np.ndarray):
    """Squared diameter of every subset (row) of `table`, as a (C,) array."""
    count, size = table.shape
    chunk = max(1, min(count, _CHUNK_ELEMENTS // (size * size)))
    chunks = -(-count // chunk)
    # Pad with copies of the last subset: argmin takes the first occurrence anyway,
    # and the padding is sliced off.
    padded = np.concatenate([table, np.repeat(table[-1:], chunks * chunk - count, 0)])
    padded = jnp.asarray(padded.reshape(chunks, chunk, size))

    def one_chunk(rows):
        rows = rows.astype(jnp.int32)
        return dist[rows[:, :, None], rows[:, None, :]].max(axis=(1, 2))

    if chunks == 1:
        return one_chunk(padded[0])[:count]
    return lax.map(one_chunk, padded).reshape(-1)[:count]


RULES = {"mda": mda}
