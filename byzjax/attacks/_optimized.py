"""Optimised attacks: min-max, min-sum, Fang et al., and rule-aware ALIE and IPM.

Every search over a scaling factor runs inside the compiled program: Fang's halving
ladder as one `jax.vmap`, the grid searches' candidates one after another
(`lax.map`, each an evaluation of the target rule on n rows) refined around the
best for a few rounds in one `lax.fori_loop`; against a rule with a
`copies_update` (the median; the trimmed mean above 32 rows) a candidate skips the
rule's network: its order statistics come from honest ones found once.
Min-max and min-sum need no search at all: their feasibility constraints are
quadratics in the factor, solved in closed form (the authors' halving search is
kept as an option for parity).

References:
  Shejwalkar, Houmansadr. "Manipulating the Byzantine: Optimizing Model Poisoning
  Attacks and Defenses for Federated Learning", NDSS 2021,
  doi:10.14722/ndss.2021.24498 (min-max, min-sum; released notebooks).
  Fang, Cao, Jia, Gong. "Local Model Poisoning Attacks to Byzantine-Robust Federated
  Learning", USENIX Security 2020, arXiv:1911.11815 (attacks on Krum and on
  trimmed mean / median).
  Baruch, Baruch, Goldberg. "A Little Is Enough", NeurIPS 2019, arXiv:1902.06156.
  Xie, Koyejo, Gupta. "Fall of Empires", UAI 2019, arXiv:1903.03936.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from byzjax import aggregators
from byzjax._checks import require, static_int
from byzjax._numerics import (
    HIGHEST,
    dot_mean,
    mean_std,
    nan_to_posinf,
    norms,
    pairwise_sq_dists,
    row_mean,
    smallest_k,
    stack_rows,
)
from byzjax.aggregators import Aggregator
from byzjax.attacks._base import Attack
from byzjax.attacks._simple import choice, make_attack

PERTURBATIONS = ("unit_vec", "std", "sign")
_AUTHORS_TOL = 1e-5  # the stopping tolerance of the authors' halving search


# --------------------------------------------------------------------------------------
# Shared pieces: the target rule, the objective, the grid search.


def target_rule(
    rule: str | Aggregator, rule_params: Mapping | None, pre: Sequence, attack: str
) -> Callable[[int], Aggregator]:
    """Resolves the rule an aggregator-aware attack optimises against.

    Args:
      rule: a registry name of `byzjax.aggregators` or a built Aggregator.
      rule_params: hyperparameters of a named rule (ignored for an Aggregator).
      pre: pre-aggregators for a named rule, as in `byzjax.aggregators.build`.
      attack: the attack's name, for error messages.

    Returns:
      ``make(f) -> Aggregator``: a named rule is built for the attack's f (the rule
      is told the true number of Byzantine workers); an Aggregator is used as given.

    Raises:
      ValueError: an unknown rule name (checked now, not at trace time).
    """
    if isinstance(rule, Aggregator):
        return lambda f: rule
    if not isinstance(rule, str):
        raise ValueError(f"{attack}: rule must be a registry name or an Aggregator")
    aggregators.get(rule)  # raises ValueError listing the valid names
    params = dict(rule_params or {})
    pre = tuple(pre)
    return lambda f: aggregators.build(rule, f=f, pre=pre, **params)


def aggregate_with(agg: Aggregator, byz: jax.Array, honest: jax.Array) -> jax.Array:
    """The rule's output on the Byzantine rows followed by the honest rows.

    The Byzantine rows come first, the placement of the reference attack codes, so
    the rule's lowest-index tie-break (SPEC T0) favours them. A stateful rule is
    evaluated from its initial state (a one-step look-ahead).
    """
    f = byz.shape[0]
    byz = byz.astype(honest.dtype)
    # Row by row (`stack_rows`): a rule that reads rows fuses the candidate's rows
    # instead of reading an (n, d) concatenated copy (its `fused_update` where it
    # has one: the form for computed rows).
    x = stack_rows(lambda i: byz[i] if i < f else honest[i - f], f + honest.shape[0])
    out = agg.computed_update(x, agg.init(x), agg.default_params)[0]
    return out.astype(honest.dtype)


def copies_evaluator(agg: Aggregator, honest: jax.Array, f: int):
    """``u -> aggregate_with(agg, f copies of u, honest)``: the rule's
    `copies_update` where it has one for these shapes (the honest rows' work
    done once for all the u of a search: the median's and the trimmed mean's
    order statistics), else the rows stacked."""
    copies = agg.copies_update
    evaluate = None if copies is None else copies(honest, f, agg.default_params)
    if evaluate is None:
        return lambda u: aggregate_with(agg, jnp.tile(u, (f, 1)), honest)
    return lambda u: evaluate(u.astype(honest.dtype))


def inner_with_mean(g: jax.Array, agg_out: jax.Array) -> jax.Array:
    """``<ḡ, A>``, the FoE inner product; NaN (a broken aggregate) counts as +Inf."""
    return nan_to_posinf(jnp.dot(g, agg_out, precision=HIGHEST))


def grid_search(
    objective: Callable[[jax.Array], jax.Array],
    lo,
    hi,
    grid: int,
    rounds: int,
    log: bool,
) -> jax.Array:
    """Minimises a scalar objective over a factor in [lo, hi] by refined grids.

    Round 1 evaluates `grid` evenly spaced candidates (in log space when `log`), one
    at a time (`lax.map`); every further round spaces `grid` candidates over the two
    cells around the best factor found so far. The best value wins; ties go to the
    smaller factor (the first candidate, SPEC T0), i.e. the stealthier attack.

    Returns:
      The best factor (a scalar).
    """
    to_t = jnp.log if log else (lambda v: v)
    from_t = jnp.exp if log else (lambda v: v)
    a0 = jnp.asarray(to_t(jnp.asarray(lo, jnp.float32)), jnp.float32)
    b0 = jnp.asarray(to_t(jnp.asarray(hi, jnp.float32)), jnp.float32)

    def one_round(_, carry):
        a, b, best_t, best_v = carry
        ts = jnp.linspace(a, b, grid)
        # One candidate at a time: each evaluation runs the target rule on an
        # (n, d) input, and a vmap over the grid held all of them at once
        # (alie_opt at (100, 1e6): 5.2 GB of temporaries and 23.5 s, sequential
        # 0.3 GB and 6.7 s).
        vals = nan_to_posinf(lax.map(lambda t: objective(from_t(t)), ts))
        i = jnp.argmin(vals)
        better = vals[i] < best_v
        best_t = jnp.where(better, ts[i], best_t)
        best_v = jnp.where(better, vals[i], best_v)
        step = (b - a) / (grid - 1)
        return (
            jnp.maximum(a0, best_t - step),
            jnp.minimum(b0, best_t + step),
            best_t,
            best_v,
        )

    init = (a0, b0, a0, jnp.asarray(jnp.inf, jnp.float32))
    _, _, best_t, _ = lax.fori_loop(0, rounds, one_round, init)
    return from_t(best_t)


def _search_args(
    attack: str, grid: int, rounds: int, lo, hi, log: bool
) -> tuple[int, int]:
    grid = static_int(grid, attack, "grid", minimum=2)
    rounds = static_int(rounds, attack, "rounds", minimum=1)
    if isinstance(lo, int | float) and isinstance(hi, int | float):
        low = "0 < lo < hi" if log else "lo < hi"
        require((lo > 0 or not log) and lo < hi, attack, low, lo=lo, hi=hi)
    return grid, rounds


# --------------------------------------------------------------------------------------
# Min-max and min-sum (Shejwalkar & Houmansadr).


def _perturbation(x: jax.Array, mu: jax.Array, kind: str, ddof: int) -> jax.Array:
    if kind == "unit_vec":
        size = jnp.linalg.norm(mu)
        return jnp.where(size > 0, mu / jnp.where(size > 0, size, 1.0), 0.0)
    if kind == "std":
        return mean_std(x, ddof)[1]
    return jnp.sign(mu)


def _largest_root(a, q, c, bound):
    """Largest gamma with ``a g^2 - 2 q g + c <= bound`` (0 when a = 0 or none > 0).

    The roots are ``(q +- sqrt(q^2 + a (bound - c))) / a``; for q < 0 the larger one
    is computed as ``(bound - c) / (sqrt(...) - q)`` to avoid cancellation.
    """
    s = jnp.sqrt(jnp.maximum(q * q + a * (bound - c), 0.0))
    plus = (q + s) / jnp.where(a > 0, a, 1.0)
    den = s - q
    minus = (bound - c) / jnp.where(den > 0, den, 1.0)
    root = jnp.where(q >= 0, plus, minus)
    return jnp.where(a > 0, jnp.maximum(root, 0.0), 0.0)


def _authors_search(feasible: Callable, gamma_init) -> jax.Array:
    """The halving search of the authors' notebooks, as one `lax.while_loop`.

    ``gamma <- gamma_0, step <- gamma_0``; each iteration: feasible -> ``succ <-
    gamma, gamma += step/2``, else ``gamma -= step/2``; ``step /= 2``; stop when
    ``|succ - gamma| <= 1e-5``. It can only return factors below ``2 gamma_0``.
    """
    g0 = jnp.asarray(gamma_init, jnp.float32)

    def cond(state):
        g, _, succ, it = state
        return (jnp.abs(succ - g) > _AUTHORS_TOL) & (it < 200)

    def body(state):
        g, step, succ, it = state
        ok = feasible(g)
        succ = jnp.where(ok, g, succ)
        g = jnp.where(ok, g + step / 2, g - step / 2)
        return g, step / 2, succ, it + 1

    init = (g0, g0, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    return lax.while_loop(cond, body, init)[2]


def _min_max_sum(
    name: str,
    objective: str,
    perturbation: str,
    search: str,
    ddof: int,
    bound: str,
    gamma_init: float,
) -> Attack:
    perturbation = choice(perturbation, PERTURBATIONS, name, "perturbation")
    search = choice(search, ("exact", "authors"), name, "search")
    ddof = static_int(ddof, name, "ddof")
    require(ddof <= 1, name, "ddof in {0, 1}", ddof=ddof)

    def body(key, x, params, f):
        h = x.shape[0]
        mu = dot_mean(x)
        p = _perturbation(x, mu, perturbation, ddof)
        # ||u(g) - x_i||^2 = c_i - 2 g q_i + g^2 a: every candidate is O(h) once
        # these O(hd) coefficients are known. No (h, d) copy of mu - x: c is one
        # fused reduction, q = mu.p - x p one matrix-vector product.
        c = nan_to_posinf(jnp.einsum("hd,hd->h", x - mu, x - mu, precision=HIGHEST))
        q = jnp.dot(mu, p, precision=HIGHEST) - jnp.matmul(x, p, precision=HIGHEST)
        a = jnp.dot(p, p, precision=HIGHEST)
        dist = pairwise_sq_dists(x, center=mu)
        if objective == "max":
            bound_ = jnp.max(dist)
            roots = _largest_root(a, q, c, bound_)
            gamma_exact = jnp.min(roots)

            def feasible(g):
                return jnp.max(c - 2 * g * q + g * g * a) <= bound_

        else:
            sums = jnp.sum(dist, axis=1)
            bound_ = jnp.min(sums) if bound == "min" else jnp.max(sums)
            gamma_exact = _largest_root(h * a, jnp.sum(q), jnp.sum(c), bound_)

            def feasible(g):
                return jnp.sum(c - 2 * g * q + g * g * a) <= bound_

        if search == "exact":
            gamma = gamma_exact
        else:
            gamma = _authors_search(feasible, params["gamma_init"])
        return mu - gamma * p

    default_params = {"gamma_init": gamma_init} if search == "authors" else {}
    return make_attack(name, default_params, body, min_honest=ddof + 1)


def min_max(
    perturbation: str = "unit_vec",
    search: str = "exact",
    ddof: int = 1,
    gamma_init: float = 10.0,
) -> Attack:
    """Min-max: ``u = ḡ - gamma* p`` as far out as the honest diameter allows.

    ``gamma* = max gamma`` s.t. ``max_{i in V} ||u(gamma) - x_i||^2 <= max_{i, j in V}
    ||x_i - x_j||^2``; every Byzantine worker sends ``u(gamma*)``. Each constraint is
    a convex quadratic in gamma that holds at gamma = 0, so gamma* is the smallest of
    the per-worker largest roots (``search="exact"``). ``search="authors"`` runs the
    released notebooks' halving search from ``params["gamma_init"]`` instead
    (capped below ``2 gamma_init``; 0.942802 where the exact value is 0.942809).

    Args:
      perturbation: p = ``"unit_vec"`` (ḡ/||ḡ||), ``"std"`` (coordinate-wise
        standard deviation) or ``"sign"`` (sign(ḡ)).
      search: ``"exact"`` (closed form) or ``"authors"``.
      ddof: ddof of the ``"std"`` perturbation; 1 as the authors' ``torch.std``.
      gamma_init: the authors' search's starting factor gamma_0 (sweepable; 10 in
        the CIFAR notebooks); unused by the exact search.

    Returns:
      An Attack; params ``{}`` (exact) or ``{"gamma_init": gamma_init}`` (authors).
    """
    return _min_max_sum("min_max", "max", perturbation, search, ddof, "max", gamma_init)


def min_sum(
    perturbation: str = "unit_vec",
    bound: str = "min",
    search: str = "exact",
    ddof: int = 1,
    gamma_init: float = 10.0,
) -> Attack:
    """Min-sum: ``u = ḡ - gamma* p`` with a bounded sum of squared distances.

    ``gamma* = max gamma`` s.t. ``sum_{i in V} ||u(gamma) - x_i||^2 <= C`` with
    ``C = min_i sum_{j in V} ||x_i - x_j||^2`` (``bound="min"``, the authors'
    released notebooks, SPEC D13's default) or ``max_i`` (``bound="max"``, the
    paper's formulation). The constraint is one quadratic in gamma, solved exactly
    (``search="exact"``) or by the authors' halving search.

    Args:
      perturbation: ``"unit_vec"``, ``"std"`` or ``"sign"`` (see `min_max`).
      bound: ``"min"`` or ``"max"``.
      search: ``"exact"`` or ``"authors"``.
      ddof: ddof of the ``"std"`` perturbation.
      gamma_init: the authors' search's gamma_0 (sweepable); unused when exact.

    Returns:
      An Attack; params ``{}`` (exact) or ``{"gamma_init": gamma_init}`` (authors).
    """
    bound = choice(bound, ("min", "max"), "min_sum", "bound")
    return _min_max_sum("min_sum", "sum", perturbation, search, ddof, bound, gamma_init)


# --------------------------------------------------------------------------------------
# Fang et al.


def _fang_trimmed_mean(x: jax.Array, key: jax.Array, b, f: int) -> jax.Array:
    # Row by row, not jnp.max(x, axis=0): XLA:CPU's reductions over the leading axis
    # are strided loops (see `row_sum`).
    g = dot_mean(x)
    g_max = functools.reduce(jnp.maximum, list(x))
    g_min = functools.reduce(jnp.minimum, list(x))
    # A parameter pushed above the honest maximum is a gradient pushed below the
    # honest minimum (and vice versa): sample beyond the side opposite to ḡ.
    lo = jnp.where(g > 0, jnp.where(g_min > 0, g_min / b, b * g_min), g_max)
    hi = jnp.where(g > 0, g_min, jnp.where(g_max > 0, b * g_max, g_max / b))
    r = jax.random.uniform(key, (f, x.shape[1]), x.dtype)
    # Row by row: as one (f, d) expression XLA fused the bounds' running max and
    # min over the h rows into it, once per Byzantine row (at (76 honest rows,
    # 1e6), f = 24: 1,015 against 395 ms, the same bits; the draw alone 289 ms).
    return lax.map(lambda r_i: lo + r_i * (hi - lo), r)


def fang_krum_lambda_max(x: jax.Array, f: int) -> jax.Array:
    """Fang et al.'s starting lambda in gradient form (reference parameters at 0).

    ``lambda_max = min_{i in V} sum_{l in Gamma_i} ||x_l - x_i|| / ((n - 2f - 1)
    sqrt(d)) + max_{i in V} ||x_i|| / sqrt(d)`` with ``Gamma_i`` the ``n - f - 2``
    nearest honest neighbours of ``x_i`` (unsquared distances).
    """
    h, d = x.shape
    n = h + f
    dist = jnp.sqrt(pairwise_sq_dists(x, center=row_mean(x)))
    dist = jnp.where(jnp.eye(h, dtype=bool), jnp.inf, dist)  # exclude the row itself
    near, _ = smallest_k(dist, n - f - 2)
    spread = jnp.min(jnp.sum(near, axis=1)) / ((n - 2 * f - 1) * math.sqrt(d))
    return spread + jnp.max(norms(x)) / math.sqrt(d)


def fang(
    variant: str = "trimmed_mean",
    b: float = 2.0,
    rule: str | Aggregator = "krum",
    rule_params: Mapping | None = None,
    pre: Sequence = (),
    halvings: int = 24,
    lam_min: float = 1e-5,
) -> Attack:
    """Fang et al.'s full-knowledge attacks, in gradient form.

    ``variant="trimmed_mean"`` (against trimmed mean and median): per coordinate j,
    with ``g_max,j``, ``g_min,j`` over the honest gradients, each Byzantine worker
    draws ``u_j`` uniformly from ``[g_min/b, g_min]`` (g_min > 0) or ``[b g_min,
    g_min]`` when ḡ_j > 0, and from ``[g_max, b g_max]`` (g_max > 0) or ``[g_max,
    g_max/b]`` when ḡ_j <= 0: the paper's parameter-space rule translated to
    gradients (SPEC 2.9; the public port samples on the wrong side).

    ``variant="krum"``: every Byzantine worker sends ``u = -lambda sign(ḡ)``, with
    lambda the first of ``lambda_max, lambda_max/2, ...`` (`halvings` candidates,
    evaluated in one vmap) for which the target rule outputs u, or the first below
    `lam_min` (the paper's stopping rule); see `fang_krum_lambda_max`.

    Args:
      variant: ``"trimmed_mean"`` or ``"krum"``.
      b: the interval factor b > 1 of the trimmed-mean variant (sweepable).
      rule: the rule the Krum variant must fool (a selection rule; a registry name
        built with the attack's f, or an Aggregator).
      rule_params: hyperparameters of a named rule.
      pre: pre-aggregators in front of a named rule.
      halvings: number of lambda candidates of the Krum variant (static).
      lam_min: the smallest lambda the Krum variant tries (sweepable).

    Returns:
      An Attack with params ``{"b": b}`` or ``{"lam_min": lam_min}``.

    Raises:
      ValueError: an unknown variant or rule; for the Krum variant n - 2f - 1 < 1
        or n - f - 2 < 1 (n = h + f).
    """
    variant = choice(variant, ("trimmed_mean", "krum"), "fang", "variant")
    if variant == "trimmed_mean":
        return make_attack(
            "fang",
            {"b": b},
            lambda key, x, params, f: _fang_trimmed_mean(x, key, params["b"], f),
        )

    make_rule = target_rule(rule, rule_params, pre, "fang")
    halvings = static_int(halvings, "fang", "halvings", minimum=1)

    def body(key, x, params, f):
        h, d = x.shape
        n = h + f
        require(n - 2 * f - 1 >= 1 and n - f - 2 >= 1, "fang", "n >= 2f + 2", n=n, f=f)
        agg = make_rule(f)
        direction = jnp.sign(row_mean(x))
        lams = fang_krum_lambda_max(x, f) * 0.5 ** jnp.arange(halvings, dtype=x.dtype)

        def selected(lam):
            u = -lam * direction
            out = aggregate_with(agg, jnp.broadcast_to(u, (f, d)), x)
            # A selection rule returns a copy of u; allow round-off for chained rules.
            return jnp.linalg.norm(out - u) <= 1e-6 * (jnp.linalg.norm(u) + 1e-30)

        stop = jax.vmap(selected)(lams) | (lams < params["lam_min"])
        k = jnp.where(jnp.any(stop), jnp.argmax(stop), halvings - 1)
        return -lams[k] * direction

    return make_attack("fang", {"lam_min": lam_min}, body, min_honest=3)


# --------------------------------------------------------------------------------------
# ALIE and IPM with the factor searched against a rule.

_OBJECTIVE_DOC = """The objective minimised is ``<ḡ, A(c)>``, the FoE inner product of
    the honest mean with the rule's aggregate when all f Byzantine rows (placed first)
    carry the factor c. Minimising it is the same as maximising the distance of the
    aggregate from ḡ along -ḡ, ``<ḡ, ḡ - A>/||ḡ||``; a negative value means the rule
    no longer descends (FoE Definition 4)."""


def alie_opt(
    rule: str | Aggregator = "median",
    rule_params: Mapping | None = None,
    pre: Sequence = (),
    lo: float = 0.0,
    hi: float = 4.0,
    grid: int = 16,
    rounds: int = 3,
    ddof: int = 0,
) -> Attack:
    """ALIE with z chosen against a rule: ``u = mu - z* sigma``.

    z* minimises the objective over ``[lo, hi]`` by a grid search (`grid`
    candidates per round, `rounds` refinements around the best; `grid_search`).

    {objective}

    Args:
      rule: the target rule: a registry name (built with the attack's f) or an
        Aggregator.
      rule_params: hyperparameters of a named rule.
      pre: pre-aggregators in front of a named rule.
      lo: smallest z searched (sweepable).
      hi: largest z searched (sweepable).
      grid: candidates per round (static).
      rounds: search rounds (static).
      ddof: ddof of sigma (SPEC D6 default 0).

    Returns:
      An Attack with params ``{{"lo": lo, "hi": hi}}``.
    """
    make_rule = target_rule(rule, rule_params, pre, "alie_opt")
    grid, rounds = _search_args("alie_opt", grid, rounds, lo, hi, False)
    ddof = static_int(ddof, "alie_opt", "ddof")
    require(ddof <= 1, "alie_opt", "ddof in {0, 1}", ddof=ddof)

    def body(key, x, params, f):
        agg = make_rule(f)
        mu, sigma = mean_std(x, ddof)

        aggregate = copies_evaluator(agg, x, f)

        def objective(z):
            return inner_with_mean(mu, aggregate(mu - z.astype(x.dtype) * sigma))

        z = grid_search(objective, params["lo"], params["hi"], grid, rounds, False)
        return mu - z.astype(x.dtype) * sigma

    return make_attack("alie_opt", {"lo": lo, "hi": hi}, body, min_honest=ddof + 1)


def ipm_opt(
    rule: str | Aggregator = "median",
    rule_params: Mapping | None = None,
    pre: Sequence = (),
    lo: float = 0.01,
    hi: float = 100.0,
    grid: int = 16,
    rounds: int = 3,
) -> Attack:
    """IPM with eps chosen against a rule: ``u = -eps* ḡ``.

    eps* minimises the objective over ``[lo, hi]`` (0 < lo < hi) by a grid
    search in log space, since the useful eps spans decades (about 0.1 against Krum,
    10 or more against the median).

    {objective}

    Args:
      rule: the target rule: a registry name (built with the attack's f) or an
        Aggregator.
      rule_params: hyperparameters of a named rule.
      pre: pre-aggregators in front of a named rule.
      lo: smallest eps searched, > 0 (sweepable).
      hi: largest eps searched (sweepable).
      grid: candidates per round (static).
      rounds: search rounds (static).

    Returns:
      An Attack with params ``{{"lo": lo, "hi": hi}}``.
    """
    make_rule = target_rule(rule, rule_params, pre, "ipm_opt")
    grid, rounds = _search_args("ipm_opt", grid, rounds, lo, hi, True)

    def body(key, x, params, f):
        agg = make_rule(f)
        g = row_mean(x)
        aggregate = copies_evaluator(agg, x, f)

        def objective(eps):
            u = -eps.astype(x.dtype) * g
            return inner_with_mean(g, aggregate(u))

        eps = grid_search(objective, params["lo"], params["hi"], grid, rounds, True)
        return -eps.astype(x.dtype) * g

    return make_attack("ipm_opt", {"lo": lo, "hi": hi}, body)


alie_opt.__doc__ = alie_opt.__doc__.format(objective=_OBJECTIVE_DOC)
ipm_opt.__doc__ = ipm_opt.__doc__.format(objective=_OBJECTIVE_DOC)

ATTACKS = {
    "min_max": min_max,
    "min_sum": min_sum,
    "fang": fang,
    "alie_opt": alie_opt,
    "ipm_opt": ipm_opt,
}
