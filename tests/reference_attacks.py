"""Plain float64 NumPy oracles for every attack, written for clarity, not speed.

Each function takes the honest gradients H (h, d) as a NumPy array and returns the f
Byzantine rows (f, d), or for randomised attacks what the output must satisfy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm


def tile(u, f):
    return np.tile(np.asarray(u, np.float64), (f, 1))


# ---------------------------------------------------------------- ALIE, IPM, simple


def z_max(n, f, form="paper"):
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        return math.inf
    if form == "paper":
        p = (n - s) / n
    else:
        p = (n - f - s) / (n - f)
    return float(norm.ppf(p))


def alie(H, f, z=None, form="paper", ddof=0):
    h, d = H.shape
    if z is None:
        z = z_max(h + f, f, form)
    u = np.zeros(d)
    for j in range(d):
        column = H[:, j]
        mu = column.sum() / h
        sigma = math.sqrt(((column - mu) ** 2).sum() / (h - ddof))
        u[j] = mu - z * sigma
    return tile(u, f)


def ipm(H, f, eps):
    return tile(-eps * H.mean(0), f)


def sign_flip_mean(H, f):
    return tile(-H.mean(0), f)


def large_opposite(H, f, lam, reduce="sum"):
    total = H.sum(0) if reduce == "sum" else H.mean(0)
    return tile(-lam * total, f)


def mimic(H, f, target):
    return tile(H[target], f)


def constant(H, f, value):
    return np.full((f, H.shape[1]), value)


# ---------------------------------------------------------------- min-max / min-sum


def perturbation(H, kind, ddof=1):
    mu = H.mean(0)
    if kind == "unit_vec":
        return mu / np.linalg.norm(mu)
    if kind == "std":
        return H.std(0, ddof=ddof)
    return np.sign(mu)


def sq_dist_matrix(H):
    h = len(H)
    D = np.zeros((h, h))
    for i in range(h):
        for j in range(h):
            D[i, j] = ((H[i] - H[j]) ** 2).sum()
    return D


def min_max_feasible(H, u):
    D = sq_dist_matrix(H)
    return max(((u - x) ** 2).sum() for x in H) <= D.max()


def min_sum_feasible(H, u, bound="min"):
    D = sq_dist_matrix(H)
    C = D.sum(1).min() if bound == "min" else D.sum(1).max()
    return sum(((u - x) ** 2).sum() for x in H) <= C


def authors_search(ok, gamma_init=10.0, tol=1e-5):
    """The halving search of Shejwalkar & Houmansadr's notebooks."""
    gamma, step, succ = gamma_init, gamma_init, 0.0
    while abs(succ - gamma) > tol:
        if ok(gamma):
            succ = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return succ


def largest_feasible(ok, tol=1e-12):
    """Largest gamma >= 0 with ok(gamma), for a feasible set [0, gamma*]."""
    hi = 1.0
    while ok(hi):
        hi *= 2
    lo = 0.0
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def min_max(H, f, kind="unit_vec", search="exact", gamma_init=10.0, ddof=1):
    mu, p = H.mean(0), perturbation(H, kind, ddof)

    def ok(g):
        return min_max_feasible(H, mu - g * p)

    g = largest_feasible(ok) if search == "exact" else authors_search(ok, gamma_init)
    return tile(mu - g * p, f), g


def min_sum(H, f, kind="unit_vec", bound="min", search="exact", gamma_init=10.0):
    mu, p = H.mean(0), perturbation(H, kind)

    def ok(g):
        return min_sum_feasible(H, mu - g * p, bound)

    g = largest_feasible(ok) if search == "exact" else authors_search(ok, gamma_init)
    return tile(mu - g * p, f), g


# ---------------------------------------------------------------- Fang et al.


def fang_trimmed_mean_interval(H, b=2.0):
    """Per-coordinate [lo, hi] from which each Byzantine coordinate is drawn."""
    d = H.shape[1]
    lo, hi = np.zeros(d), np.zeros(d)
    for j in range(d):
        g = H[:, j].mean()
        g_max, g_min = H[:, j].max(), H[:, j].min()
        if g > 0:
            lo[j], hi[j] = (g_min / b, g_min) if g_min > 0 else (b * g_min, g_min)
        else:
            lo[j], hi[j] = (g_max, b * g_max) if g_max > 0 else (g_max, g_max / b)
    return lo, hi


def krum(X, f):
    """Krum with squared distances and n - f - 2 neighbours, ties to lowest index."""
    n = len(X)
    k = n - f - 2
    D = sq_dist_matrix(X)
    scores = [np.sort(np.delete(D[i], i))[:k].sum() for i in range(n)]
    return X[int(np.argmin(scores))]


def fang_krum_lambda_max(H, f):
    h, d = H.shape
    n = h + f
    dist = np.sqrt(sq_dist_matrix(H))
    sums = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(h)]
    spread = min(sums) / ((n - 2 * f - 1) * math.sqrt(d))
    return spread + max(np.linalg.norm(x) for x in H) / math.sqrt(d)


def fang_krum(H, f, rule=krum, lam_min=1e-5, halvings=24):
    """The paper's halving loop: stop when the rule picks u or lambda < lam_min."""
    s = np.sign(H.mean(0))
    lam = fang_krum_lambda_max(H, f)
    for _ in range(halvings - 1):
        u = -lam * s
        X = np.concatenate([tile(u, f), H])
        if lam < lam_min or np.allclose(rule(X, f), u, rtol=1e-6, atol=0):
            break
        lam /= 2
    return tile(-lam * s, f), lam


# ---------------------------------------------------------------- mimic heuristic


def mimic_heuristic(steps, warmup, z0, f):
    """Karimireddy et al.'s MimicVariantAttacker over a list of honest sets."""
    mu, z, target, out = None, z0.astype(np.float64), None, []
    for t, H in enumerate(steps):
        avg = H.mean(0)
        if t == 0:
            mu = avg
            cumu = sum(((x - mu) @ z) * (x - mu) for x in H)
            z = cumu / np.linalg.norm(cumu)
        elif t < warmup:
            mu = t / (1 + t) * mu + avg / (1 + t)
            cumu = sum(((x - mu) @ z) * (x - mu) for x in H)
            z = t / (1 + t) * z + cumu / np.linalg.norm(cumu) / (1 + t)
            z = z / np.linalg.norm(z)
        if t < warmup:
            target = int(np.argmax(H @ z))
        out.append(tile(H[target], f))
    return out


# ---------------------------------------------------------------- data poisoning


def label_flip(y, num_classes):
    return np.array([num_classes - 1 - int(v) for v in y])


def backdoor_image(img, size, corner, value):
    """Stamps one (H, W[, C]) image."""
    img = np.array(img, np.float64)
    height, width = img.shape[:2]
    rows = range(size) if corner.startswith("top") else range(height - size, height)
    cols = range(size) if corner.endswith("left") else range(width - size, width)
    for r in rows:
        for c in cols:
            img[r, c] = value
    return img
