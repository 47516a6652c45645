"""Plain float64 NumPy oracle for every aggregation rule and pre-aggregator.

Written for clarity, not speed: explicit loops, the SPEC's formulas verbatim (SPEC
sections 1.1-1.13 and Appendix A). Ties follow SPEC T0: every ordering sorts by the
pair (key, index) through `np.lexsort`. Inputs are finite (the oracle says nothing
about NaN or Inf; the contract tests check those).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def order_by(keys) -> np.ndarray:
    """Indices ordering `keys` ascending, ties to the lowest index (SPEC T0)."""
    keys = np.asarray(keys)
    return np.lexsort((np.arange(len(keys)), keys))


def sq_dists(x) -> np.ndarray:
    """D_ij = ||x_i - x_j||^2, by a double loop."""
    x = _f64(x)
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = np.sum((x[i] - x[j]) ** 2)
    return out


def mean(x, f=0):
    return _f64(x).mean(0)


def median(x, f=0):
    """Coordinate-wise median, average of the two middles for even n (SPEC D4)."""
    x = _f64(x)
    n, d = x.shape
    out = np.empty(d)
    for j in range(d):
        col = np.sort(x[:, j])
        out[j] = col[n // 2] if n % 2 else 0.5 * (col[n // 2 - 1] + col[n // 2])
    return out


def trimmed_mean(x, f=0, b=None):
    x = _f64(x)
    n, d = x.shape
    b = f if b is None else b
    return np.array([np.sort(x[:, j])[b : n - b].mean() for j in range(d)])


def mean_around_median(x, f=0, keep=None, variant="xie"):
    """Per coordinate, mean of the `keep` values closest to the median (ties T0)."""
    x = _f64(x)
    n, d = x.shape
    if keep is None:
        keep = n - f - (1 if variant == "alie" else 0)
    med = median(x)
    out = np.empty(d)
    for j in range(d):
        chosen = order_by(np.abs(x[:, j] - med[j]))[:keep]
        out[j] = x[chosen, j].mean()
    return out


def rank_mean_weights(x, ranks) -> np.ndarray:
    """d(mean of the order statistics `ranks`)/dx, (n, d): rank r's value v,
    shared equally by the rows equal to v (the derivative byzjax takes at ties;
    one-hot where the values differ). The median and the trimmed mean."""
    x = _f64(x)
    w = np.zeros_like(x)
    for j in range(x.shape[1]):
        col = np.sort(x[:, j])
        for r in ranks:
            hit = x[:, j] == col[r]
            w[hit, j] += 1.0 / (len(ranks) * hit.sum())
    return w


def mean_around_median_weights(x, keep) -> np.ndarray:
    """d(mean around the median)/dx, (n, d): 1/keep on the entries it averages
    (ties T0), the selection held fixed."""
    x = _f64(x)
    med = median(x)
    w = np.zeros_like(x)
    for j in range(x.shape[1]):
        w[order_by(np.abs(x[:, j] - med[j]))[:keep], j] = 1.0 / keep
    return w


def krum_scores(x, f, k=None):
    """s_i = sum of the k smallest squared distances to the other rows."""
    x = _f64(x)
    n = len(x)
    k = n - f - 2 if k is None else k
    dist = sq_dists(x)
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


def krum(x, f, neighbors=None, variant="paper"):
    x = _f64(x)
    if neighbors is None:
        neighbors = len(x) - f - (1 if variant == "byzfl" else 2)
    return x[order_by(krum_scores(x, f, neighbors))[0]]


def multi_krum(x, f, m=None, neighbors=None, variant="paper"):
    x = _f64(x)
    n = len(x)
    m = n - f if m is None else m
    if neighbors is None:
        neighbors = n - f - (1 if variant == "byzfl" else 2)
    return x[order_by(krum_scores(x, f, neighbors))[:m]].mean(0)


def bulyan_selection(x, f):
    """Iterated Krum on the remaining set (SPEC 1.6), original indices in order."""
    x = _f64(x)
    n = len(x)
    theta = n - 2 * f
    remaining = list(range(n))
    picked = []
    for _ in range(theta):
        k = max(1, len(remaining) - f - 2)
        best = int(order_by(krum_scores(x[remaining], f, k))[0])
        picked.append(remaining.pop(best))
    return picked


def bulyan(x, f):
    x = _f64(x)
    n, d = x.shape
    beta = n - 4 * f
    # Ties in the coordinate stage go to the lower worker index (T0), so the selected
    # set is taken in index order, not in selection order.
    chosen = x[sorted(bulyan_selection(x, f))]
    med = median(chosen)
    out = np.empty(d)
    for j in range(d):
        closest = order_by(np.abs(chosen[:, j] - med[j]))[:beta]
        out[j] = chosen[closest, j].mean()
    return out


def geometric_median(x, f=0, init="median", nu=1e-6, relative_nu=True, iterations=8):
    """Smoothed Weiszfeld (SPEC 1.7) with the byzjax defaults (SPEC D8)."""
    x = _f64(x)
    n, d = x.shape
    if init == "median":
        z = median(x)
    elif init == "mean":
        z = x.mean(0)
    else:
        z = np.zeros(d)
    if relative_nu:
        nu = nu * max(1.0, float(np.median(np.linalg.norm(x, axis=1))))
    for _ in range(iterations):
        weights = np.array([1.0 / max(nu, np.linalg.norm(z - xi)) for xi in x])
        z = (weights[:, None] * x).sum(0) / weights.sum()
    return z


def centered_clipping(x, f=0, tau=1.0, iterations=1, v=None):
    """v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau/||x_i - v_l||)."""
    x = _f64(x)
    n, d = x.shape
    v = np.zeros(d) if v is None else _f64(v)
    for _ in range(iterations):
        step = np.zeros(d)
        for xi in x:
            diff = xi - v
            r = np.linalg.norm(diff)
            step += diff * (1.0 if r == 0 else min(1.0, tau / r))
        v = v + step / n
    return v


def mda(x, f):
    """Mean of the first (lexicographic) subset of n - f rows of least diameter."""
    x = _f64(x)
    n = len(x)
    dist = np.sqrt(sq_dists(x))
    best, best_subset = None, None
    for subset in itertools.combinations(range(n), n - f):
        diam = max(
            (dist[i, j] for i, j in itertools.combinations(subset, 2)), default=0.0
        )
        if best is None or diam < best:
            best, best_subset = diam, subset
    return x[list(best_subset)].mean(0)


def sign_majority(x, f=0, zero_sign=0):
    x = _f64(x)

    def sign(v):
        s = np.sign(v)
        return np.where(s == 0, zero_sign, s)

    return sign(sign(x).sum(0))


# ---------------------------------------------------------------- pre-aggregators


def nnm(x, f):
    """y_i = mean of the n - f nearest rows of x_i, itself included, ties T0."""
    x = _f64(x)
    n = len(x)
    dist = sq_dists(x)
    return np.array([x[order_by(dist[i])[: n - f]].mean(0) for i in range(n)])


def bucketing(x, f=0, s=2, perm=None):
    """Bucket means of x[perm]; the last bucket divided by its real size (D10)."""
    x = _f64(x)
    n = len(x)
    perm = np.arange(n) if perm is None else np.asarray(perm)
    xp = x[perm]
    return np.array([xp[t : min(t + s, n)].mean(0) for t in range(0, n, s)])


def clipping(x, f=0, tau=1.0):
    x = _f64(x)
    out = x.copy()
    for i, xi in enumerate(x):
        r = np.linalg.norm(xi)
        if r > tau:
            out[i] = xi * (tau / r)
    return out


def arc(x, f):
    """Clip the k = floor(2 f (n - f) / n) largest rows to the (k+1)-th norm."""
    x = _f64(x)
    n = len(x)
    k = int(math.floor(2 * f / n * (n - f)))
    r = np.linalg.norm(x, axis=1)
    order = order_by(-r)
    out = x.copy()
    if k > 0:
        c = r[order[k]]
        for i in order[:k]:
            out[i] = x[i] * min(1.0, c / r[i])
    return out


RULES = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "mean_around_median": mean_around_median,
    "krum": krum,
    "multi_krum": multi_krum,
    "bulyan": bulyan,
    "geometric_median": geometric_median,
    "centered_clipping": centered_clipping,
    "mda": mda,
    "sign_majority": sign_majority,
}
PRE = {"nnm": nnm, "bucketing": bucketing, "clipping": clipping, "arc": arc}
