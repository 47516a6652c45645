"""Coordinate-wise order statistics: median, trimmed mean, mean around the median.

Each coordinate is aggregated on its own, so the cost is one sort (or selection) of
every column of X over the worker axis: bandwidth bound, O(nd log n) at most. All order
statistics go through the shared helpers of `byzjax._numerics` (NaN sorts as +Inf, so
at most f broken rows are trimmed away).

References:
  Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018, arXiv:1803.01498 (median, trimmed mean).
  Xie, Koyejo, Gupta. "Generalized Byzantine-tolerant SGD", arXiv:1802.10116 (mean
  around median).
  Baruch, Baruch, Goldberg. "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019, arXiv:1902.06156 (their "trimmed mean" is a
  mean around the median of n - f - 1 values).
"""

from __future__ import annotations

from byzjax._checks import require, static_int
from byzjax._numerics import (
    coordinate_mean_around_median,
    coordinate_median,
    coordinate_trimmed_mean,
    median_with_copies,
    trimmed_mean_with_copies,
)
from byzjax.aggregators._base import Aggregator, stateless


def _networked(rule, copies_fn=None) -> Aggregator:
    """A stateless rule from `rule(stored)`: on stored rows its network may run
    as a generated CPU loop; on rows computed in the same program (after a
    pre-aggregator) it stays in XLA's fused loop, which reads them as they are
    computed instead of writing them out first. `copies_fn`: see `stateless`."""
    return stateless(
        rule(True), promote=False, fused_fn=rule(False), copies_fn=copies_fn
    )


def median(f: int = 0) -> Aggregator:
    """Coordinate-wise median, Med(X)_j = median(x_0j, ..., x_(n-1)j).

    Odd n: the middle order statistic. Even n: the average of the two middle ones
    (numpy's convention, SPEC D4; torch-based codes return the lower one).

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A stateless Aggregator.

    Raises:
      ValueError: when traced with n < 2f + 1.

    References:
      Yin et al., ICML 2018, arXiv:1803.01498.
    """
    f = static_int(f, "median", "f")

    def check(n):
        require(n >= 2 * f + 1, "median", "n >= 2f + 1", n=n, f=f)

    def rule(stored):
        def fn(x, params):
            check(x.shape[0])
            return coordinate_median(x, stored=stored)

        return fn

    def copies_fn(honest, copies, params):
        check(honest.shape[0] + copies)
        return median_with_copies(honest, copies)

    return _networked(rule, copies_fn)


def trimmed_mean(f: int = 0, *, b: int | None = None) -> Aggregator:
    """Coordinate-wise b-trimmed mean (Yin et al.'s beta-trimmed mean with b = beta n).

    TrMean_b(X)_j = (1/(n - 2b)) sum_{k=b+1}^{n-b} x_(k),j: the b smallest and the b
    largest values of every coordinate are dropped and the rest averaged.

    Args:
      f: number of Byzantine workers tolerated.
      b: values trimmed on each side; defaults to f (ByzFL `TrMean(f)`, Karimireddy
        `TM(b=f)`). Robust only when b is at least the actual number of attackers.

    Returns:
      A stateless Aggregator.

    Raises:
      ValueError: when traced with n < 2b + 1.

    References:
      Yin et al., ICML 2018, arXiv:1803.01498.
    """
    f = static_int(f, "trimmed_mean", "f")
    b = f if b is None else static_int(b, "trimmed_mean", "b")

    def check(n):
        require(n >= 2 * b + 1, "trimmed_mean", "n >= 2b + 1", n=n, f=f, b=b)

    def rule(stored):
        def fn(x, params):
            check(x.shape[0])
            return coordinate_trimmed_mean(x, b, stored=stored)

        return fn

    def copies_fn(honest, copies, params):
        check(honest.shape[0] + copies)
        return trimmed_mean_with_copies(honest, copies, b)

    return _networked(rule, copies_fn)


_MAM_VARIANTS = {"xie": 0, "alie": 1}


def mean_around_median(
    f: int = 0, *, keep: int | None = None, variant: str = "xie"
) -> Aggregator:
    """Mean around the median: per coordinate, the mean of the values nearest it.

    MaM(X)_j = (1/q) sum_{i in M_j} x_ij, where M_j holds the q workers with the
    smallest |x_ij - Med(X)_j| (ties to the lower worker index, SPEC T0) and Med is
    the coordinate-wise median (average of the middles for even n).

    The default q = n - f is Xie et al.'s definition and ByzFL's `Meamed`;
    `variant="alie"` keeps q = n - f - 1, which is what the ALIE authors' code calls
    "trimmed mean" (SPEC D5). This is not Yin's trimmed mean (`trimmed_mean`).

    Args:
      f: number of Byzantine workers tolerated.
      keep: explicit q (overrides `variant`), 1 <= q <= n.
      variant: "xie" (q = n - f, default) or "alie" (q = n - f - 1).

    Returns:
      A stateless Aggregator.

    Raises:
      ValueError: unknown variant, or when traced with n < 2f + 1 or q outside
        [1, n].

    References:
      Xie, Koyejo, Gupta, arXiv:1802.10116; Baruch et al., arXiv:1902.06156.
    """
    rule = "mean_around_median"
    f = static_int(f, rule, "f")
    if variant not in _MAM_VARIANTS:
        raise ValueError(
            f"{rule}: unknown variant {variant!r}; valid: {', '.join(_MAM_VARIANTS)}"
        )
    keep = None if keep is None else static_int(keep, rule, "keep", minimum=1)

    def build(stored):
        def fn(x, params):
            n = x.shape[0]
            require(n >= 2 * f + 1, rule, "n >= 2f + 1", n=n, f=f)
            q = n - f - _MAM_VARIANTS[variant] if keep is None else keep
            require(1 <= q <= n, rule, "1 <= keep <= n", n=n, f=f, keep=q)
            return coordinate_mean_around_median(x, q, stored=stored)

        return fn

    return _networked(build)


RULES = {
    "median": median,
    "trimmed_mean": trimmed_mean,
    "mean_around_median": mean_around_median,
}
