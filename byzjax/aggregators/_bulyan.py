"""Bulyan over Krum, in the paper's form (SPEC 1.6, decision D3).

Selection: theta = n - 2f rounds of Krum on the remaining set; coordinate stage: per
coordinate, the mean of the beta = theta - 2f selected values closest to their median.
The distance matrix is computed once; every round masks the removed workers with +Inf
inside a `lax.fori_loop`, so shapes stay static and nothing is recomputed.

References:
  El Mhamdi, Guerraoui, Rouault. "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018, arXiv:1802.07927.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from byzjax._checks import require, static_int
from byzjax._numerics import (
    coordinate_mean_around,
    coordinate_median,
    nan_to_posinf,
    pairwise_sq_dists,
    robust_center,
    smallest_k,
    take_rows,
)
from byzjax.aggregators._base import Aggregator, stateless


def bulyan_selection(x: jax.Array, f: int, theta: int) -> jax.Array:
    """Indices of the theta workers picked by iterated Krum, in selection order.

    Round t sees |R| = n - t remaining workers and scores them with
    k_t = max(1, |R| - f - 2) nearest remaining neighbours (squared distances); the
    argmin (ties to the lower original index, SPEC T0) is appended and removed.

    Args:
      x: (n, d) array in the compute dtype.
      f: number of Byzantine workers tolerated.
      theta: static number of rounds.

    Returns:
      (theta,) int32 indices.
    """
    n = x.shape[0]
    dist = pairwise_sq_dists(x, center=robust_center(x, f))
    eye = jnp.eye(n, dtype=bool)
    # k_t shrinks with t but top_k needs a static count: take the largest, k_0, and
    # keep the first k_t of each row.
    k_max = max(1, min(n - 1, n - f - 2))
    rank = jnp.arange(k_max)

    def round_(t, carry):
        removed, picked = carry
        k = jnp.maximum(1, n - t - f - 2)
        masked = jnp.where(eye | removed[None, :], jnp.inf, dist)
        nearest, _ = smallest_k(masked, k_max)
        # `where`, not a 0/1 product: the entries past k may be +Inf.
        score = nan_to_posinf(jnp.where(rank[None, :] < k, nearest, 0.0).sum(axis=1))
        score = jnp.where(removed, jnp.inf, score)
        # First remaining index attaining the minimum; unlike a bare argmin it can
        # never return a removed worker when every remaining score is +Inf.
        best = jnp.argmax((score == jnp.min(score)) & ~removed)
        return removed.at[best].set(True), picked.at[t].set(best)

    init = (jnp.zeros(n, bool), jnp.zeros(theta, jnp.int32))
    _, picked = lax.fori_loop(0, theta, round_, init)
    return picked


def bulyan(f: int = 0) -> Aggregator:
    """Bulyan with Krum as the selection rule (paper form).

    theta = n - 2f, beta = theta - 2f. S = the theta workers chosen by iterated Krum
    (`bulyan_selection`); m_j = median_{i in S} x_ij (average of the middles for even
    theta, SPEC D4); Bulyan(X)_j = (1/beta) sum of the beta values of S closest to
    m_j (ties to the lower original worker index, SPEC T0; the Appendix A script
    breaks them by selection order instead, which differs only on exact ties).

    The AggregaThor/Garfield kernel (Multi-Krum rows, t = n - 2f - 2, upper median)
    and the ALIE authors' variant give different numbers and are not offered.

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A stateless Aggregator.

    Raises:
      ValueError: when traced with n < 4f + 3.

    References:
      El Mhamdi, Guerraoui, Rouault, ICML 2018, arXiv:1802.07927.
    """
    f = static_int(f, "bulyan", "f")

    def fn(x, params):
        n = x.shape[0]
        require(n >= 4 * f + 3, "bulyan", "n >= 4f + 3", n=n, f=f)
        theta = n - 2 * f
        # Sorted, so that ties in the coordinate stage go to the lower worker index
        # (SPEC T0) rather than to the earlier selected worker.
        chosen = take_rows(x, jnp.sort(bulyan_selection(x, f, theta)))
        return coordinate_mean_around(chosen, coordinate_median(chosen), theta - 2 * f)

    return stateless(fn, promote=False, stored=True)


RULES = {"bulyan": bulyan}
