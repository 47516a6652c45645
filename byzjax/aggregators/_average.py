"""The plain average, the non-robust baseline (breakdown point 0).

References:
  Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017: no rule that is a linear
  combination of the inputs tolerates a single Byzantine worker.
"""

from __future__ import annotations

import jax.numpy as jnp

from byzjax import _native
from byzjax._checks import static_int
from byzjax._numerics import row_mean, weighted_row_sum
from byzjax.aggregators._base import Aggregator, stateless

# Above this many float32 rows, XLA's fused row sum is slower than one read.
_FUSED_ROWS_MAX = 32


def mean(f: int = 0) -> Aggregator:
    """Coordinate-wise average, Mean(X) = (1/n) sum_i x_i.

    Not robust: with a NaN, Inf or 1e38 row the output may be non-finite. That is the
    documented behaviour of the baseline, not a bug.

    Args:
      f: accepted for a uniform signature; the mean ignores it.

    Returns:
      A stateless Aggregator.
    """
    static_int(f, "mean", "f")

    def average(x, kernel_dtypes):
        if x.size and _native.usable(x, dtypes=kernel_dtypes):
            return _native.row_rule(x, _native.MEAN)
        return row_mean(x)

    def fn(x, params):
        # Stored rows on the CPU through the kernel: XLA:CPU's loops over 16-bit
        # elements are scalar (bfloat16 (25, 1e6): 54-72 ms, 3.4 ms to read the
        # same bytes as float32), and its fused sum of more than about 32 float32
        # rows reads as many interleaved streams (at (100, 1e6) 1.5x a read, the
        # kernel 1.0x; at (16, 1e6) and (25, 1e6) both at the read, and the
        # fused sum the faster of the two at (25, 1e5): 1.05x against 1.6x).
        wide = x.shape[0] > _FUSED_ROWS_MAX
        return average(x, (jnp.float32, jnp.bfloat16) if wide else (jnp.bfloat16,))

    def fused_fn(x, params):
        # Computed float32 rows: the row additions fuse with their computation
        # (clipping then mean at (25, 1e6): 17 ms fused, 145 ms with the rows
        # written out for a product, under glibc's default malloc).
        return average(x, (jnp.bfloat16,))

    def weighted_fn(x, s, keep, params):
        # The mean of the rows s_i x_i (keep_i): one weighted sum of the stored
        # rows, no scaled copy (see `PreAggregator.row_scales`).
        return weighted_row_sum(s / x.shape[0], x, keep)

    return stateless(fn, promote=False, fused_fn=fused_fn, weighted_fn=weighted_fn)


RULES = {"mean": mean}
