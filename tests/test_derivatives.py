"""Derivatives of the order-statistic rules against plain NumPy float64, and the
cost of the rules' reverse passes.

The coordinate-wise rules are locally linear in their rows: each coordinate is a
mean of selected entries. Their derivatives (the simulator's influence weights
take a VJP through them) are those weights: one-hot on the row holding an order
statistic, shared equally among rows of equal value; 1/k on each entry the mean
around the median keeps. They are taken through the rows' selection, never
through a sorting network's compare-exchanges, whose reverse pass XLA:CPU
compiled into programs that ran for minutes from n = 34 rows on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from byzjax import _sorting
from byzjax import aggregators as agg
from byzjax.sim import diagnostics

# n on each side of 32 (the full networks below, the pruned ones and the
# window forms above), even and odd (one or two middle ranks).
SIZES = (7, 24, 40, 65)


def _rule_weights(name, x, f):
    n = x.shape[0]
    if name == "median":
        return reference.rank_mean_weights(x, sorted({(n - 1) // 2, n // 2}))
    if name == "trimmed_mean":
        return reference.rank_mean_weights(x, range(f, n - f))
    return reference.mean_around_median_weights(x, n - f)


def _check_rule_derivatives(name, x, f):
    """The rule's VJP and JVP in one random direction each against the weights."""
    rng = np.random.default_rng(x.shape[0])
    rule = agg.build(name, f=f)

    def apply(x):
        return rule.update(x, rule.init(x), rule.default_params)[0]

    want = _rule_weights(name, x, f)
    cotangent = rng.normal(size=x.shape[1]).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.dot(apply(x), cotangent)))(x)
    np.testing.assert_allclose(grad, want * cotangent, rtol=1e-5, atol=1e-6)
    tangent = rng.normal(size=x.shape).astype(np.float32)
    out = jax.jit(lambda x, t: jax.jvp(apply, (x,), (t,))[1])(x, tangent)
    np.testing.assert_allclose(out, (want * tangent).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "mean_around_median"])
def test_rule_derivatives_match_numpy(kernels_or_xla, name, n):
    x = np.random.default_rng([n, len(name)]).normal(size=(n, 48)).astype(np.float32)
    _check_rule_derivatives(name, x, n // 5)


@pytest.mark.parametrize("n", [9, 40])
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "mean_around_median"])
def test_rule_derivatives_at_ties_match_numpy(name, n):
    # ALIE's Byzantine rows are one vector sent f times, and small integers
    # tie everywhere: equal rows get equal derivatives (order statistics), or
    # the lower worker the selection (mean around the median, SPEC T0).
    rng = np.random.default_rng([n, 7])
    x = rng.integers(-3, 4, size=(n, 48)).astype(np.float32)
    x[: n // 4] = x[n - 1]
    _check_rule_derivatives(name, x, n // 5)


@pytest.mark.parametrize("n", [6, 40])
def test_network_wires_derivatives_match_numpy(n):
    # Every wire of a full network (and the middle ranks off the pruned one):
    # the generic rule any consumer of the wires gets.
    rng = np.random.default_rng(n)
    x = rng.integers(-2, 3, size=(n, 32)).astype(np.float32)
    full = n <= _sorting.FULL_NETWORK_MAX_N
    ranks = tuple(range(n)) if full else _sorting.middle_ranks(n)

    def wires(x):
        return _sorting.ranked_rows(x) if full else _sorting.order_statistics(x, ranks)

    for i, r in enumerate(ranks):
        grad = jax.grad(lambda x, i=i: wires(x)[i].sum())(x)
        np.testing.assert_allclose(grad, reference.rank_mean_weights(x, [r]), atol=1e-7)


def test_rule_derivatives_under_vmap_match_each_input():
    rule = agg.build("trimmed_mean", f=8)
    xs = np.random.default_rng(3).normal(size=(3, 40, 32)).astype(np.float32)

    def grad(x):
        return jax.grad(
            lambda x: rule.update(x, rule.init(x), rule.default_params)[0].sum()
        )(x)

    batched = jax.jit(jax.vmap(grad))(xs)
    for x, got in zip(xs, batched, strict=True):
        np.testing.assert_allclose(
            got, reference.rank_mean_weights(x, range(8, 32)), atol=1e-7
        )


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "mean_around_median"])
def test_rule_gradient_programs_stay_small(monkeypatch, name):
    """The gradient of the XLA form at 40 rows costs a few forwards (XLA's count
    of its operations: 2.3-3.3), not a copy of a network for each
    compare-exchange or row (through the networks: 36-157, and the median's
    gradient of (40, 5000) ran for more than 280 s)."""
    monkeypatch.setenv("BYZJAX_NATIVE", "0")
    rule = agg.build(name, f=8)
    x = jnp.zeros((40, 1000), jnp.float32)

    def loss(x):
        return rule.update(x, rule.init(x), rule.default_params)[0].sum()

    def flops(fn):
        return jax.jit(fn).lower(x).compile().cost_analysis()["flops"]

    assert flops(jax.grad(loss)) < 8 * flops(loss)


def test_geometric_median_gradient_memory_does_not_grow_with_steps(kernels_or_xla):
    """The reverse pass recomputes each Weiszfeld step from its carry: before, the
    kernels' loop kept an (n, d) residual a step (temporaries of 15.5 inputs at
    T = 4, 42.8 at T = 16, at (40, 20,000); now 8.7 and 9.0)."""
    x = jnp.zeros((40, 20000), jnp.float32)

    def temporaries(iterations):
        rule = agg.build("geometric_median", f=8, iterations=iterations)

        def influence(x):
            return diagnostics.aggregate_with_influence(
                rule.update, x, rule.init(x), rule.default_params
            )

        return (
            jax.jit(influence).lower(x).compile().memory_analysis().temp_size_in_bytes
        )

    assert temporaries(16) - temporaries(4) < x.nbytes
