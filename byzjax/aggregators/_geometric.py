"""Geometric median by the smoothed Weiszfeld iteration (RFA), SPEC 1.7 and D8.

GM(X) = argmin_z sum_i ||z - x_i||. Each of the T iterations reads X twice (distances,
then the weighted sum; once with the CPU kernel), O(Tnd) time and O(n + d) extra
memory. On the CPU kernels, the steps can instead run on one Gram matrix of X
(O(n^2 d) multiply-adds in one read, then O(T n^2)), where that costs less than the
T reads (`route`).

References:
  Pillutla, Kakade, Harchaoui. "Robust Aggregation for Federated Learning", IEEE
  Transactions on Signal Processing 2022, arXiv:1912.13445.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from byzjax import _native
from byzjax._checks import require, static_int
from byzjax._numerics import (
    HIGHEST,
    compute_dtype,
    coordinate_median,
    kernel_input,
    kernel_rows,
    nan_to_posinf,
    norms,
    patch_if,
    promoted_rows,
    robust_center,
    root,
    row_dots,
    row_sq_dists,
    sum_rows,
    weighted_row_sum,
)
from byzjax.aggregators._base import Aggregator, stateless

# (init, nu, relative_nu, iterations) of the reference codes (SPEC D8).
PRESETS = {
    # byzjax default: finite and robust start even with 1e38 rows, scale-aware nu.
    "byzjax": ("median", 1e-6, True, 8),
    # RFA experiments (geom_median package, maxiter=4).
    "rfa": ("mean", 1e-6, False, 4),
    # ByzFL GeometricMedian defaults.
    "byzfl": ("zero", 0.1, False, 3),
    # Karimireddy, He, Jaggi codes (epfml/byzantine-robust-optimizer rfa.py).
    "karimireddy": ("zero", 0.1, False, 8),
}
_INITS = ("median", "mean", "zero")
_ROUTES = ("auto", "gram", "direct")


# The Gram kernel's cost per row of x (times n + 1 rows), in reads of a float32
# x, (plain, centred) by itemsize: its bfloat16 loop widens each row as it loads.
_GRAM_COST = {4: (0.064, 0.077), 2: (0.081, 0.12)}


def _gram_pays(n: int, iterations: int, centred: bool, itemsize: int) -> bool:
    """Whether the Gram route costs less than the direct one, in reads of a float32
    x as measured with the CPU kernels on 2 cores at (25 | 100, 1e6), both presets,
    float32 and bfloat16 (docs/performance.md): the Gram route 2.0 reads plus
    `_GRAM_COST` per row (n + 1), the direct one 1.6 plus 1.7 per step after the
    first (bfloat16 rows read no faster there: they are widened as they are read).
    """
    gram = 2.0 + _GRAM_COST[itemsize][centred] * (n + 1)
    return gram < 1.6 + 1.7 * (iterations - 1)


def _start(x, init):
    finite = jnp.isfinite(norms(x))
    dtype = compute_dtype(x.dtype)
    if init == "median":
        # The rows are in memory for the kernels: the median's network too.
        return coordinate_median(x, stored=kernel_rows(x))
    if init == "mean":
        # Mean of the rows with a finite norm: equal to the plain mean on finite
        # input (RFA parity), but a NaN or 1e38 row cannot make the start non-finite.
        rows = promoted_rows(x)
        total = sum_rows(lambda i: jnp.where(finite[i], rows[i], 0.0), x.shape[0])
        return total / jnp.maximum(finite.sum(), 1).astype(dtype)
    return jnp.zeros(x.shape[1], dtype)


def _inverse_distance(sq, floor):
    """1 / max(nu', sqrt(sq)), as 1 / sqrt(max(nu'^2, sq)): the root's derivative
    stays finite at sq = 0 (a row at the iterate, or an unusable row's 0), where
    0 * Inf would make every row's derivative NaN in a reverse pass."""
    return lax.rsqrt(jnp.maximum(floor * floor, sq))


def gram_steps(g, init, floor, iterations):
    """T smoothed Weiszfeld steps on the Gram matrix g of the rows centred on c.

    z is kept as z = c + sum_j w_j (x_j - c), so that ||x_i - z||^2 =
    G_ii - 2 (G w)_i + w'Gw; z_0 = c (w = 0) for the median and zero starts
    (c = z_0), the mean of the usable rows for the mean start (c = 0). A row
    whose G_ii is not finite is unusable, as in the direct route.

    Returns:
      (w, ok): the last weights, and whether every usable row's distance at
      every step had a rounding error bound (`_native.gram_error`, relative to
      (|x_i - c| + sum_j |w_j| |x_j - c|)^2) within the direct sums' own
      (`_native.DIRECT_SQ_ERROR`, relative to max(nu'^2, distance^2)).
    """
    n = g.shape[0]
    diag = jnp.diagonal(g)
    usable = jnp.isfinite(diag)
    g = jnp.where(usable[:, None] & usable[None, :], g, 0.0)
    diag = jnp.where(usable, diag, 0.0)
    size = jnp.sqrt(diag)
    w = jnp.zeros(n, g.dtype)
    if init == "mean":
        w = usable / jnp.maximum(usable.sum(), 1).astype(g.dtype)
    error, allowed = _native.gram_error(n), _native.DIRECT_SQ_ERROR

    def step(_, carry):
        w, ok = carry
        gw = jnp.matmul(g, w, precision=HIGHEST)
        sq = jnp.maximum(diag - 2.0 * gw + jnp.dot(w, gw, precision=HIGHEST), 0.0)
        spread = size + jnp.dot(jnp.abs(w), size, precision=HIGHEST)
        exact = error * spread**2 <= allowed * jnp.maximum(floor**2, sq)
        ok = ok & jnp.all(exact | ~usable)
        beta = jnp.where(usable, _inverse_distance(sq, floor), 0.0)
        total = beta.sum()
        return jnp.where(total > 0, beta / total, w), ok

    return lax.fori_loop(0, iterations, step, (w, jnp.array(True)))


def geometric_median(
    f: int = 0,
    *,
    preset: str = "byzjax",
    iterations: int | None = None,
    init: str | None = None,
    nu: float | None = None,
    relative_nu: bool | None = None,
    route: str = "auto",
) -> Aggregator:
    """Geometric median, T steps of smoothed Weiszfeld from z_0.

    beta_i = 1 / max(nu', ||z_t - x_i||), z_{t+1} = sum_i beta_i x_i / sum_i beta_i,
    output z_T. nu' = nu * max(1, median_i ||x_i||) when `relative_nu` (so the
    smoothing follows the scale of the gradients), else nu.

    A row whose norm is not finite (NaN, +-Inf, or a square that overflows float32
    such as 1e38) gets beta_i = 0 and its entries are zeroed before the weighted sum,
    so 0 * Inf never turns into NaN. If every weight vanishes, z stays put.

    Args:
      f: number of Byzantine workers tolerated.
      preset: defaults for the four knobs below (SPEC D8): "byzjax" (median start,
        nu = 1e-6 relative, T = 8), "rfa" (mean, 1e-6, T = 4), "byzfl" (zero, 0.1,
        T = 3), "karimireddy" (zero, 0.1, T = 8). Explicit arguments override it.
      iterations: T >= 1, static.
      init: z_0: "median" (coordinate-wise), "mean" (of the rows with a finite
        norm) or "zero".
      nu: smoothing floor, sweepable: it lives in `params["nu"]`.
      relative_nu: whether nu is multiplied by max(1, median row norm).
      route: how the CPU kernels run the steps (float32 or bfloat16 rows; other
        backends and dtypes always take the direct route). "direct": T + 1 reads
        of x, each step's weighted sum with the next distances. "gram": one read
        for the Gram matrix of x centred on z_0 (not centred for the zero and mean
        starts), the T steps on it, a last read for the sum; its distances
        ||x_i - z||^2 = G_ii - 2 (G w)_i + w'Gw are checked against a bound on
        their rounding error, and if that bound exceeds the direct sums' own (x
        far from the centre compared with the distances, as for rows sharing a
        large mean with a zero start) the steps run the direct route instead.
        "auto": the Gram route where it costs fewer reads (`_gram_pays`: in
        float32 n <= 19 with T = 2, n <= 45 with T = 3, n <= 148 with T = 8 from
        the median; in bfloat16 n <= 15, 36 and 94).

    Returns:
      A stateless Aggregator with `default_params = {"nu": nu}`.

    Raises:
      ValueError: unknown preset, init or route, nu <= 0, or when traced with
        n < 2f + 1.

    References:
      Pillutla, Kakade, Harchaoui, arXiv:1912.13445.
    """
    rule = "geometric_median"
    f = static_int(f, rule, "f")
    if preset not in PRESETS:
        raise ValueError(f"{rule}: unknown preset {preset!r}; valid: {list(PRESETS)}")
    p_init, p_nu, p_rel, p_iter = PRESETS[preset]
    init = p_init if init is None else init
    nu = p_nu if nu is None else nu
    relative_nu = p_rel if relative_nu is None else bool(relative_nu)
    iterations = p_iter if iterations is None else iterations
    iterations = static_int(iterations, rule, "iterations", minimum=1)
    if init not in _INITS:
        raise ValueError(f"{rule}: unknown init {init!r}; valid: {list(_INITS)}")
    if not nu > 0:
        raise ValueError(f"{rule}: requires nu > 0, got nu={nu}")
    if route not in _ROUTES:
        raise ValueError(f"{rule}: unknown route {route!r}; valid: {list(_ROUTES)}")

    def fn(x, params):
        n = x.shape[0]
        require(n >= 2 * f + 1, rule, "n >= 2f + 1", n=n, f=f)
        x = kernel_input(x)
        kernel = kernel_rows(x)
        floor = jnp.asarray(params["nu"], compute_dtype(x.dtype))
        centred = init == "median"
        gram = kernel and (
            route == "gram"
            or (
                route == "auto" and _gram_pays(n, iterations, centred, x.dtype.itemsize)
            )
        )
        if gram:
            z0 = None
            if centred:  # x is in memory for the kernels: the network too
                z0 = coordinate_median(x, stored=True).astype(jnp.float32)
            g, q = _native.gram(x, z0)
            if relative_nu:
                size = root(nan_to_posinf(q))
                scale = coordinate_median(size[:, None])[0]
                floor = floor * jnp.maximum(1.0, scale)
            w, ok = gram_steps(g, init, floor, iterations)
            # The zero and mean starts' sum from no centre: an empty z, not read.
            centre = jnp.zeros((0,), jnp.float32) if z0 is None else z0
            z = _native.step_sq_dists(x, centre, w, False)[0]

            def fallback(_, x, floor, centre):
                # The median start is z_0, the centre; the zero and mean starts
                # are made here, where the fallback runs (no (d,) zeros written
                # for a loop that does not).
                return direct(x, floor, centre if z0 is not None else _start(x, init))

            return patch_if(~ok, fallback, z, x, floor, centre)
        if relative_nu:
            scale = coordinate_median(norms(x)[:, None])[0]
            floor = floor * jnp.maximum(1.0, scale)
        return direct(x, floor, _start(x, init))

    def direct(x, floor, z0):
        kernel = kernel_rows(x)

        def weights(sq, usable):
            beta = jnp.where(usable, _inverse_distance(sq, floor), 0.0)
            return beta, beta.sum()

        if kernel:
            # A step in one read of x (`step_sq_dists`): the weighted sum, then the
            # rows' distances to it from cache, exact (no centre, no
            # cancellation), where the products below read x twice; T steps take
            # T + 1 reads. Paired at (100, 1e6): ByzFL's preset (zero start,
            # T = 3) 97 -> 75 ms, the byzjax preset (median start, T = 8) 275 ->
            # 220 ms; at (25, 1e6) 30.6 -> 23.8 and 94 -> 70 ms.
            def kernel_step(z, sq, distances=True):
                beta, total = weights(sq, jnp.isfinite(sq))
                w = jnp.where(total > 0, beta / total, 0.0)  # 0: z stays
                z, sq = _native.step_sq_dists(x, z, w, distances)
                return z, nan_to_posinf(sq)

            sq0 = row_sq_dists(x, z0)
            z, sq = lax.fori_loop(
                0, iterations - 1, _recomputed(lambda _, c: kernel_step(*c)), (z0, sq0)
            )
            return kernel_step(z, sq, distances=False)[0]

        def move(z, sq, usable):
            beta, total = weights(sq, usable)
            moved = weighted_row_sum(beta, x, usable) / total
            return jnp.where(total > 0, moved, z)

        # Distances through a centre c inside the honest range (SPEC D18 as in
        # `pairwise_sq_dists`): ||x_i - z||^2 = a_i - 2 (x_i - c).(z - c) + ||z - c||^2
        # with a_i = ||x_i - c||^2 read once, so that a step is two matrix-vector
        # products over x (distances, weighted sum) instead of two fused passes: at
        # (100, 1e6) 14 ms each against 67 and 36 ms.
        c = z0 if init == "median" else robust_center(x, f)
        a = row_sq_dists(x, c)
        usable = jnp.isfinite(a)

        def step(_, z):
            w = z - c
            proj = row_dots(x, w) - jnp.dot(c, w, precision=HIGHEST)
            sq = jnp.maximum(a - 2.0 * proj + jnp.dot(w, w, precision=HIGHEST), 0.0)
            return move(z, sq, usable)

        return lax.fori_loop(0, iterations, _recomputed(step), z0)

    return stateless(fn, {"nu": nu}, promote=False, stored=True)


def _recomputed(step):
    """A loop step that a reverse pass recomputes from its carry (z and the
    distances) instead of keeping what it computed over x: the loop stacked an
    (n, d) residual a step, (T - 1) x 40 MB at (100, 1e5). No effect on a program
    that is not differentiated."""
    return jax.checkpoint(step, prevent_cse=False)


RULES = {"geometric_median": geometric_median}
