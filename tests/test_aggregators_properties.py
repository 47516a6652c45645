"""Hypothesis properties of the rules: invariances, ranges and the bounds they promise.

Shapes are fixed per property so that each rule compiles once; hypothesis varies the
values. Rules that break ties by worker index (SPEC T0) are only permutation
invariant on tie-free data, so those properties draw Gaussian data from a seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import byzjax
from byzjax import aggregators
from byzjax.aggregators._preagg import arc_count
from byzjax.sim import diagnostics

N, F, D = 9, 2, 4
N_BULYAN = 11

# Rules whose output is a convex combination of the inputs, per coordinate.
CONVEX = {
    "mean": {},
    "median": {},
    "trimmed_mean": {},
    "mean_around_median": {},
    "krum": {},
    "multi_krum": {},
    "bulyan": {},
    "geometric_median": {},
    "mda": {},
}
VALUE_BASED = ("mean", "median", "trimmed_mean", "sign_majority")
TRANSLATION = ("median", "trimmed_mean", "mean_around_median", "krum")
TRANSLATION += ("multi_krum", "bulyan", "mda", "geometric_median", "mean")
SCALE = ("median", "trimmed_mean", "mean_around_median", "krum", "multi_krum")
SCALE += ("bulyan", "mda", "sign_majority")
ALL = dict(CONVEX, sign_majority={}, centered_clipping={"tau": 1.0})

seeds = st.integers(0, 2**32 - 1)
# XLA:CPU flushes subnormals to zero, so they are left out.
values = st.floats(-100, 100, allow_subnormal=False, width=32)


def _n(name):
    return N_BULYAN if name == "bulyan" else N


def _run(name, x):
    return aggregators.one_shot(name, f=F, **ALL[name])(x)


def _gaussian(seed, n):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


@given(
    x=hnp.arrays(np.float32, (N, D), elements=values),
    perm=st.permutations(range(N)),
)
def test_value_based_rules_are_permutation_invariant(x, perm):
    for name in VALUE_BASED:
        a, b = _run(name, x), _run(name, x[list(perm)])
        # The tree sum of the mean and the trimmed mean adds in a different order.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


@given(seed=seeds, perm_seed=seeds)
def test_every_rule_is_permutation_invariant_without_ties(seed, perm_seed):
    # Not Bulyan: once k_t = 1 its score is the distance to the nearest neighbour, so
    # every mutual-nearest pair ties exactly (SPEC 1.6) and T0 decides by index. Not
    # MDA: every subset holding the diametral pair and no farther point has the same
    # diameter, and the first in lexicographic order (by index) wins. Both follow the
    # oracle on permuted inputs (test_aggregators.py).
    for name in sorted(set(ALL) - {"bulyan", "mda"}):
        n = _n(name)
        x = _gaussian(seed, n)
        perm = np.random.default_rng(perm_seed).permutation(n)
        a, b = _run(name, x), _run(name, x[perm])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@given(seed=seeds, shift=hnp.arrays(np.float32, (D,), elements=st.floats(-20, 20)))
def test_translation_equivariance(seed, shift):
    for name in TRANSLATION:
        x = _gaussian(seed, _n(name))
        a = np.asarray(_run(name, x + shift))
        b = np.asarray(_run(name, x)) + shift
        # x + shift is rounded in float32 (~2e-6 at 20); Weiszfeld's floor nu also
        # follows the median norm, which a shift changes.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4, err_msg=name)


@given(seed=seeds, scale=st.floats(1e-3, 1e3))
def test_scale_equivariance(seed, scale):
    for name in SCALE:
        x = _gaussian(seed, _n(name))
        a = np.asarray(_run(name, x * np.float32(scale)))
        b = np.asarray(_run(name, x))
        if name != "sign_majority":  # the vote is scale invariant
            b = b * np.float32(scale)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * scale, err_msg=name)


@given(x=hnp.arrays(np.float32, (N_BULYAN, D), elements=values))
def test_output_within_coordinate_range(x):
    for name in CONVEX:
        rows = x[: _n(name)]
        out = np.asarray(_run(name, rows))
        lo, hi = rows.min(0), rows.max(0)
        slack = 1e-5 * (1 + np.abs(rows).max(0))
        assert np.all(out >= lo - slack) and np.all(out <= hi + slack), name


@given(
    seed=seeds,
    byz=hnp.arrays(
        np.float32,
        (F, D),
        elements=st.one_of(
            st.floats(-1e30, 1e30),
            st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -1e38]),
        ),
    ),
    where=st.permutations(range(N)),
)
def test_median_and_trimmed_mean_stay_in_the_honest_range(seed, byz, where):
    honest = _gaussian(seed, N - F)
    x = np.empty((N, D), np.float32)
    x[list(where[:F])] = byz
    x[list(where[F:])] = honest
    lo, hi = honest.min(0), honest.max(0)
    for name in ("median", "trimmed_mean"):
        out = np.asarray(_run(name, x))
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6), name


@given(seed=seeds)
def test_krum_returns_an_input_row(seed):
    x = _gaussian(seed, N)
    out = np.asarray(_run("krum", x))
    assert np.any(np.all(x == out, axis=1))


@given(seed=seeds)
def test_geometric_median_descends_the_objective(seed):
    x = _gaussian(seed, N)
    x[:F] += 10.0  # an outlying group, so the start is not already optimal

    def objective(z):
        return np.linalg.norm(x.astype(np.float64) - z, axis=1).sum()

    out = np.asarray(_run("geometric_median", x), np.float64)
    start = np.median(x.astype(np.float64), axis=0)
    assert objective(out) <= objective(start) + 1e-4


@given(seed=seeds, tau=st.floats(0.01, 10.0), iterations=st.sampled_from([1, 3]))
def test_centered_clipping_moves_at_most_l_tau(seed, tau, iterations):
    x = 5.0 * _gaussian(seed, N)
    agg = aggregators.build("centered_clipping", f=F, tau=1.0, iterations=iterations)
    out, state = _cc_step(agg, iterations)(x, agg.init(x), {"tau": jnp.float32(tau)})
    assert np.linalg.norm(np.asarray(out)) <= iterations * tau * (1 + 1e-5)
    np.testing.assert_array_equal(out, state)


_CC = {}


def _cc_step(agg, iterations):
    if iterations not in _CC:
        _CC[iterations] = jax.jit(agg.update)
    return _CC[iterations]


_PRE = {}


def _pre(name, **params):
    key = (name, tuple(sorted(params.items())))
    if key not in _PRE:
        pre = aggregators.get_pre(name)(F, **params)
        _PRE[key] = jax.jit(lambda x, p: pre.update(x, pre.init(x), p)[0])
    return _PRE[key]


@given(x=hnp.arrays(np.float32, (N, D), elements=values), tau=st.floats(0.1, 50.0))
def test_clipping_bounds_every_norm(x, tau):
    y = np.asarray(_pre("clipping", tau=1.0)(x, {"tau": jnp.float32(tau)}))
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    assert np.all(norms <= tau * (1 + 1e-5))
    inside = np.linalg.norm(x.astype(np.float64), axis=1) <= tau * (1 - 1e-5)
    np.testing.assert_array_equal(y[inside], x[inside])


@given(x=hnp.arrays(np.float32, (N, D), elements=values))
def test_arc_clips_exactly_the_k_largest(x):
    y = np.asarray(_pre("arc")(x, ()), np.float64)
    r = np.linalg.norm(x.astype(np.float64), axis=1)
    k = arc_count(N, F)
    c = np.sort(r)[::-1][k]
    assert np.all(np.linalg.norm(y, axis=1) <= c * (1 + 1e-5) + 1e-6)
    small = r < c
    np.testing.assert_array_equal(y[small], x[small])


@given(x=hnp.arrays(np.float32, (N, D), elements=values))
def test_nnm_rows_stay_in_the_coordinate_range(x):
    y = np.asarray(_pre("nnm")(x, ()))
    slack = 1e-5 * (1 + np.abs(x).max(0))
    assert np.all(y >= x.min(0) - slack) and np.all(y <= x.max(0) + slack)


@given(seed=seeds)
def test_bucketing_preserves_the_mean(seed):
    # s divides n: the mean of the bucket means is the mean of the inputs.
    x = _gaussian(seed, 8)
    out = byzjax.aggregate("mean", x, f=1, pre=[("bucketing", {"s": 2, "seed": 3})])
    np.testing.assert_allclose(out, x.astype(np.float64).mean(0), atol=1e-5)


@pytest.mark.parametrize("name", TRANSLATION)
def test_influence_weights_sum_to_one_for_translation_equivariant_rules(name):
    # F(x + 1 c) = F(x) + c makes the rows' Jacobians sum to the identity, so
    # the simulator's influence weights (a VJP of 1/d) sum to 1.
    x = jnp.asarray(np.random.default_rng(3).normal(size=(11, 40)), jnp.float32)
    agg = aggregators.build(name, f=2, **ALL[name])
    weights = jax.jit(  # as in the simulator: one compilation, not op by op
        lambda x: diagnostics.aggregate_with_influence(
            agg.update, x, agg.init(x), agg.default_params
        )[2]
    )(x)
    np.testing.assert_allclose(float(weights.sum()), 1.0, rtol=1e-4)
