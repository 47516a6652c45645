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
from byzjax._numerics import compute_dtype, row_mean
from byzjax.aggregators._base import Aggregator, stateless


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

    def fn(x, params):
        # A bfloat16 input on the CPU through the kernel: XLA:CPU's loops over
        # 16-bit elements are scalar (54-72 ms for (25, 1e6), 3.4 ms to read the
        # same bytes as float32).
        if x.size and _native.usable(x, dtypes=(jnp.bfloat16,)):
            return _native.row_rule(x, _native.MEAN)
        return row_mean(x.astype(compute_dtype(x.dtype)))

    return stateless(fn, promote=False)


RULES = {"mean": mean}
