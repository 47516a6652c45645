"""The plain average, the non-robust baseline (breakdown point 0).

References:
  Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017: no rule that is a linear
  combination of the inputs tolerates a single Byzantine worker.
"""

from __future__ import annotations

from byzjax._checks import static_int
from byzjax._numerics import promoted_row_mean
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
    return stateless(lambda x, params: promoted_row_mean(x), promote=False)


RULES = {"mean": mean}
