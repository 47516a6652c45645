"""The contract every registered rule and pre-aggregator must meet (registry driven).

Each name in `aggregators.names()` and `aggregators.pre_names()` needs an entry in the
tables below (a test fails otherwise), and then automatically gets the whole battery:
output shape and dtype (float32, bfloat16), one trace under jit, f = 0 behaviour,
finite output with at most f NaN / +-Inf / 1e38 Byzantine rows (SPEC D18), all-equal
and all-zero inputs, pytree input equal to the flat result, a precondition ValueError
naming the rule, n, f and the inequality, and ValueErrors for bad names and arguments.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import byzjax
from byzjax import aggregators
from byzjax.sim import diagnostics

D = 6


def rule_entry(n=9, f=2, params=None, bad=None, f0=None, robust=True, fixed=True):
    """One rule's test configuration.

    Args:
      n, f: a valid configuration.
      params: builder arguments needed (e.g. a required tau).
      bad: ((n, f), inequality) violating the precondition, or None if the rule has
        no precondition on n.
      f0: "mean" if the rule with f = 0 is the plain mean.
      robust: whether at most f non-finite rows must leave the output finite.
      fixed: whether n identical rows aggregate to that row.
    """
    return dict(
        n=n, f=f, params=params or {}, bad=bad, f0=f0, robust=robust, fixed=fixed
    )


HALF = ((4, 2), "n >= 2f + 1")
RULES = {
    "mean": rule_entry(f0="mean", robust=False),
    "median": rule_entry(bad=HALF),
    "trimmed_mean": rule_entry(bad=((4, 2), "n >= 2b + 1"), f0="mean"),
    "mean_around_median": rule_entry(bad=HALF, f0="mean"),
    "krum": rule_entry(bad=((6, 2), "n >= 2f + 3")),
    "multi_krum": rule_entry(bad=((6, 2), "n >= 2f + 3"), f0="mean"),
    "bulyan": rule_entry(n=11, bad=((10, 2), "n >= 4f + 3"), f0="mean"),
    "geometric_median": rule_entry(bad=HALF),
    "centered_clipping": rule_entry(params={"tau": 1.0}, bad=HALF, fixed=False),
    "mda": rule_entry(bad=HALF, f0="mean"),
    "sign_majority": rule_entry(bad=HALF, fixed=False),
}

# Pre-aggregators: n_out for the valid (n, f) = (9, 2), and f0 = "identity" or
# "mean" (every row becomes the mean) where that is the f = 0 behaviour.
PRE = {
    "nnm": dict(params={}, n_out=9, bad=HALF, f0="mean"),
    "bucketing": dict(params={"s": 2}, n_out=5, bad=None, f0=None),
    "clipping": dict(params={"tau": 1.0}, n_out=9, bad=None, f0=None),
    "arc": dict(params={}, n_out=9, bad=HALF, f0="identity"),
}

# Builder arguments each rule must refuse with a ValueError naming the rule.
BAD_ARGS = {
    "trimmed_mean": [{"b": -1}],
    "mean_around_median": [{"variant": "nope"}, {"keep": 0}],
    "krum": [{"variant": "nope"}, {"neighbors": 0}],
    "multi_krum": [{"m": 0}, {"variant": "nope"}],
    "geometric_median": [
        {"preset": "nope"},
        {"init": "nope"},
        {"nu": 0.0},
        {"iterations": 0},
        {"route": "nope"},
    ],
    "centered_clipping": [{}, {"tau": -1.0}, {"tau": 1.0, "iterations": 0}],
    "mda": [{"max_subsets": 0}],
    "sign_majority": [{"zero_sign": 2}],
}
PRE_BAD_ARGS = {
    "bucketing": [{"s": 0}, {"s": 1.5}],
    "clipping": [{}, {"tau": 0.0}],
}

NON_FINITE = {
    "nan": np.nan,
    "+inf": np.inf,
    "-inf": -np.inf,
    "1e38": 1e38,
    "-1e38": -1e38,
}
DTYPES = [jnp.float32, jnp.bfloat16]


def _x(n, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, D)), dtype)


def _run(name, f, params, x):
    """One aggregation through the cached jitted entry point (compiled once)."""
    return aggregators.one_shot(name, f=f, **params)(x)


def _pre_run(name, f, params, x, rule="median"):
    return aggregators.one_shot(rule, f=f, pre=[(name, params)])(x)


def test_every_registered_rule_is_in_the_battery():
    assert set(RULES) == set(aggregators.names()), "add the rule to RULES"
    assert set(PRE) == set(aggregators.pre_names()), "add it to PRE"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_shape_dtype_and_non_finite_rows(name, dtype):
    cfg = RULES[name]
    n, f = cfg["n"], cfg["f"]
    x = _x(n, dtype)
    out = _run(name, f, cfg["params"], x)
    assert out.shape == (D,) and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    rng = np.random.default_rng(1)
    for label, value in NON_FINITE.items():
        for rows in (np.arange(f), rng.choice(n, size=f, replace=False)):
            broken = x.at[rows].set(value)
            out = _run(name, f, cfg["params"], broken)
            if cfg["robust"]:
                assert bool(jnp.all(jnp.isfinite(out))), (label, rows)
    # Mixed: one NaN row and one row with a single -Inf coordinate.
    mixed = x.at[0].set(jnp.nan).at[n - 1, 2].set(-jnp.inf)
    out = _run(name, f, cfg["params"], mixed)
    if cfg["robust"]:
        assert bool(jnp.all(jnp.isfinite(out)))
    else:
        # The mean is not robust: a NaN row makes it NaN (documented).
        assert not bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("n", [25, 40])
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_reads_bfloat16_without_a_float32_copy(name, n, kernels_or_xla):
    """Memory target: input + O(n^2 + d). A float32 copy of a bfloat16 (n, d) input
    is twice its bytes; the rule's temporaries must stay under half of them."""
    cfg = RULES[name]
    f = 2 if name == "mda" else cfg["f"]
    agg = aggregators.get(name)(f, **cfg["params"])
    x = jax.ShapeDtypeStruct((n, 1_000_000), jnp.bfloat16)
    fn = jax.jit(lambda x: agg.update(x, agg.init(x), agg.default_params)[0])
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * 1_000_000 * 2 / 2, f"{temp / 1e6:.1f} MB of temporaries"


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_equal_and_zero_rows(name):
    cfg = RULES[name]
    n, f = cfg["n"], cfg["f"]
    row = jnp.asarray(np.linspace(-1.5, 2.0, D), jnp.float32)
    same = jnp.tile(row, (n, 1))
    out = _run(name, f, cfg["params"], same)
    assert bool(jnp.all(jnp.isfinite(out)))
    if cfg["fixed"]:
        np.testing.assert_allclose(out, row, rtol=1e-5, atol=1e-6)
    zeros = jnp.zeros((n, D), jnp.float32)
    assert bool(jnp.all(_run(name, f, cfg["params"], zeros) == 0))


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_compiles_once(name):
    cfg = RULES[name]
    agg = aggregators.build(name, f=cfg["f"], **cfg["params"])
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, state, params):
        return agg.update(x, state, params)

    x = _x(cfg["n"])
    state = agg.init(x)
    for seed in range(3):
        out, state = step(_x(cfg["n"], seed=seed), state, agg.default_params)
    assert out.shape == (D,)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_with_f_zero(name):
    cfg = RULES[name]
    n = cfg["n"]
    x = _x(n, seed=3)
    x64 = np.asarray(x, np.float64)
    out = np.asarray(_run(name, 0, cfg["params"], x), np.float64)
    tol = 2e-4 if name == "geometric_median" else 2e-5
    expect = reference.RULES[name](x64, 0, **cfg["params"])
    np.testing.assert_allclose(out, expect, rtol=tol, atol=tol)
    if cfg["f0"] == "mean":
        np.testing.assert_allclose(out, x64.mean(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_pytree_equals_flat(name):
    cfg = RULES[name]
    n, f = cfg["n"], cfg["f"]
    x = _x(n, seed=4)
    tree = {"a": x[:, :2], "b": x[:, 2:].reshape(n, 2, 2)}
    out = byzjax.aggregate(name, tree, f=f, **cfg["params"])
    flat = byzjax.aggregate(name, x, f=f, **cfg["params"])
    assert out["a"].shape == (2,) and out["b"].shape == (2, 2)
    np.testing.assert_array_equal(out["a"], flat[:2])
    np.testing.assert_array_equal(out["b"].reshape(-1), flat[2:])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_fused_update_equals_update(name, dtype):
    # The form for computed rows (after a pre-aggregator) is the same rule: on 37
    # columns (a kernel's 8-lane tail), with a NaN row, and with 40 rows (the mean
    # reads stored float32 rows through its kernel above 32).
    cfg = RULES[name]
    agg = aggregators.build(name, f=cfg["f"], **cfg["params"])
    if agg.fused_update is None:
        return
    rng = np.random.default_rng(7)
    shapes = [(cfg["n"], 37), (40, 37)]
    # One compile per shape for all inputs.
    forms = [
        jax.jit(lambda x, u=u: u(x, agg.init(x), agg.default_params)[0])
        for u in (agg.update, agg.fused_update)
    ]
    for x in [rng.normal(size=s) for s in shapes] + [np.full(shapes[0], 0.5)]:
        x = jnp.asarray(x, dtype)
        for rows in (x, x.at[1].set(jnp.nan)):
            stored, fused = (form(rows) for form in forms)
            assert stored.dtype == fused.dtype == dtype
            np.testing.assert_allclose(
                np.asarray(stored, np.float64),
                np.asarray(fused, np.float64),
                rtol=1e-6 if dtype == jnp.float32 else 1e-2,
                atol=1e-6 if dtype == jnp.float32 else 1e-2,
            )


COPIES = sorted(
    name
    for name, cfg in RULES.items()
    if aggregators.build(name, f=cfg["f"], **cfg["params"]).copies_update
)


def test_copies_updates_are_known():
    # A rule that gains a `copies_update` (the rule-aware attacks' fast path)
    # should be listed here on purpose.
    assert COPIES == ["median", "trimmed_mean"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("name", COPIES)
def test_rule_copies_update_equals_update_on_stacked_rows(name, dtype):
    # What the rule-aware attacks evaluate per candidate: the rule over f copies
    # of u followed by the honest rows, the honest rows' work done once. The
    # values of `computed_update` on the stacked rows (signs of zeros aside), in
    # the input dtype, for a u inside the honest spread, beyond it, and NaN; at
    # the battery's n and at 40 rows (where a form may exist for one only).
    cfg = RULES[name]
    f = cfg["f"]
    agg = aggregators.build(name, f=f, **cfg["params"])
    rng = np.random.default_rng(3)
    update = jax.jit(
        lambda x: agg.computed_update(x, agg.init(x), agg.default_params)[0]
    )
    tested = 0
    for n in (cfg["n"], 40):
        honest = jnp.asarray(rng.normal(size=(n - f, 37)), dtype)
        if agg.copies_update(honest, f, agg.default_params) is None:
            continue
        tested += 1
        evaluate = jax.jit(lambda x, u: agg.copies_update(x, f, agg.default_params)(u))
        for u in (honest[0] * 0.5, honest[1] + 9.0, jnp.full(37, jnp.nan, dtype)):
            got = evaluate(honest, u)
            want = update(jnp.concatenate([jnp.tile(u, (f, 1)), honest]))
            assert got.dtype == want.dtype == dtype
            np.testing.assert_array_equal(
                np.asarray(got, np.float64), np.asarray(want, np.float64)
            )
    assert tested, name
    if cfg["bad"]:
        (n, bad_f), inequality = cfg["bad"]
        bad = aggregators.build(name, f=bad_f, **cfg["params"])
        with pytest.raises(ValueError, match=re.escape(inequality)):
            bad.copies_update(honest[: n - bad_f], bad_f, bad.default_params)


def _vmap_batch(n):
    """Three inputs for one vmapped call: clean, with a NaN row and a -Inf entry
    (the rules' non-finite fallbacks), and small integers (ties everywhere)."""
    rng = np.random.default_rng(11)
    clean = rng.normal(size=(n, 37))
    broken = clean.copy()
    broken[0], broken[n - 1, 2] = np.nan, -np.inf
    ties = rng.integers(-2, 3, size=(n, 37))
    return jnp.asarray(np.stack([clean, broken, ties]), jnp.float32)


def _assert_vmap_equals_each(update, x):
    # Sweeps vmap the rules: every fallback must still fix only the inputs that
    # need it (a batched predicate turns a lax.cond into a select).
    batched = jax.jit(jax.vmap(update))(x)
    for got, x_i in zip(batched, x, strict=True):
        want = jax.jit(update)(x_i)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_vmapped_equals_each_input(name):
    cfg = RULES[name]
    agg = aggregators.build(name, f=cfg["f"], **cfg["params"])
    x = _vmap_batch(cfg["n"])
    _assert_vmap_equals_each(
        lambda x: agg.update(x, agg.init(x), agg.default_params)[0], x
    )


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_vmapped_equals_each_input(name):
    cfg = PRE[name]
    agg = aggregators.build("median", f=2, pre=[(name, cfg["params"])])
    _assert_vmap_equals_each(
        lambda x: agg.update(x, agg.init(x), agg.default_params)[0], _vmap_batch(9)
    )


def test_chain_runs_the_rules_fused_update():
    def const(v):
        return lambda x, state, params: (jnp.full(x.shape[1], v, x.dtype), state)

    rule = aggregators.Aggregator(lambda x: (), const(0.0), (), const(1.0))
    alone = aggregators.chain((), rule)
    chained = aggregators.chain([aggregators.get_pre("clipping")(tau=1.0)], rule)
    x = _x(5)
    assert bool(jnp.all(alone.update(x, (), ())[0] == 0.0))
    out = chained.update(x, chained.init(x), chained.default_params)[0]
    assert bool(jnp.all(out == 1.0))
    # A rule with a weighted form gets a scaling stage's factors instead of its
    # rows; after a stage without factors, the rows as before.
    weighted = rule._replace(
        weighted_update=lambda x, s, keep, state, params: (
            jnp.full(x.shape[1], 2.0, x.dtype),
            state,
        )
    )
    for pres, want in [(["clipping"], 2.0), (["arc"], 2.0), (["clipping", "nnm"], 1.0)]:
        built = [aggregators.get_pre(p)(1, **PRE[p]["params"]) for p in pres]
        chained = aggregators.chain(built, weighted)
        out = chained.update(x, chained.init(x), chained.default_params)[0]
        assert bool(jnp.all(out == want)), pres


SCALING_PRE = sorted(
    n for n in PRE if aggregators.get_pre(n)(2, **PRE[n]["params"]).row_scales
)


def test_scaling_pre_aggregators_are_known():
    # The clipping stages scale rows; a stage that mixes them must not claim it.
    assert SCALING_PRE == ["arc", "clipping"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("name", SCALING_PRE)
def test_row_scales_are_the_rows_and_the_mean_after_them_their_mean(name, dtype):
    # y_i = s_i x_i where keep_i, else 0, on clean and broken rows; the mean after
    # the stage (its weighted form: one weighted sum of x) is the mean of y,
    # against float64 on the stage's own rows.
    n, f = 9, 2
    pre = aggregators.get_pre(name)(f, **PRE[name]["params"])
    chained = aggregators.build("mean", f=f, pre=[(name, PRE[name]["params"])])
    rows = jax.jit(lambda x: pre.wide_update(x, (), pre.default_params)[0])
    scales = jax.jit(lambda x: pre.row_scales(x, (), pre.default_params)[0])
    mean = jax.jit(
        lambda x: chained.update(x, chained.init(x), chained.default_params)[0]
    )
    rng = np.random.default_rng(4)
    x = _x(n, dtype)
    cases = {"clean": x}
    for label, value in NON_FINITE.items():
        cases[label] = x.at[rng.choice(n, size=f, replace=False)].set(value)
    tol = 2e-5 if dtype == jnp.float32 else 1e-2
    for label, xb in cases.items():
        y = np.asarray(rows(xb), np.float64)
        s, keep = (np.asarray(a) for a in scales(xb))
        assert keep.dtype == bool and s.shape == keep.shape == (n,)
        x64 = np.asarray(xb.astype(jnp.float32), np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            want = np.where(keep[:, None], s[:, None] * x64, 0.0)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=0, err_msg=label)
        out = mean(xb)
        assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out))), label
        np.testing.assert_allclose(
            np.asarray(out, np.float64), y.mean(0), rtol=tol, atol=tol, err_msg=label
        )


def _precondition_pattern(name, n, f, inequality):
    return (
        rf"^{re.escape(name)}: requires {re.escape(inequality)}, "
        rf"got n={n}, f={f}\b"
    )


@pytest.mark.parametrize("name", sorted(n for n in RULES if RULES[n]["bad"]))
def test_rule_precondition_error(name):
    cfg = RULES[name]
    (n, f), inequality = cfg["bad"]
    with pytest.raises(ValueError, match=_precondition_pattern(name, n, f, inequality)):
        byzjax.aggregate(name, _x(n), f=f, **cfg["params"])


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_bad_arguments(name):
    cfg = RULES[name]
    for bad_f in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=re.escape(name)):
            aggregators.build(name, f=bad_f, **cfg["params"])
    for args in BAD_ARGS.get(name, []):
        with pytest.raises(ValueError, match=re.escape(name)):
            aggregators.build(name, f=cfg["f"], **args)
    with pytest.raises(ValueError, match="unknown parameter.*bogus"):
        aggregators.build(name, f=cfg["f"], bogus=1, **cfg["params"])


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown aggregator 'nope'.*valid names"):
        aggregators.build("nope", f=1)
    with pytest.raises(ValueError, match="unknown pre-aggregator 'nope'.*valid names"):
        aggregators.build("median", f=1, pre=["nope"])


# ------------------------------------------------------------------ pre-aggregators


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_shape_dtype_and_non_finite_rows(name, dtype):
    cfg = PRE[name]
    n, f = 9, 2
    pre = aggregators.get_pre(name)(f, **cfg["params"])
    assert pre.n_out(n) == cfg["n_out"]
    x = _x(n, dtype)
    run = jax.jit(lambda x: pre.update(x, pre.init(x), pre.default_params)[0])
    y = run(x)
    assert y.shape == (cfg["n_out"], D) and y.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(y)))
    rng = np.random.default_rng(2)
    for label, value in NON_FINITE.items():
        rows = rng.choice(n, size=f, replace=False)
        broken = x.at[rows].set(value)
        # Followed by a robust rule, the result is finite.
        out = _pre_run(name, f, cfg["params"], broken)
        assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out))), label
        if name != "bucketing":  # row i of the output belongs to worker i
            y = run(broken)
            honest = np.setdiff1d(np.arange(n), rows)
            assert bool(jnp.all(jnp.isfinite(y[honest]))), label


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_compiles_once_and_f_zero(name):
    cfg = PRE[name]
    pre = aggregators.get_pre(name)(0, **cfg["params"])
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, state, params):
        return pre.update(x, state, params)

    x = _x(9, seed=5)
    state = pre.init(x)
    for seed in range(3):
        y, state = step(_x(9, seed=seed), state, pre.default_params)
    assert y.shape == (cfg["n_out"], D)
    x64 = np.asarray(x, np.float64)
    y = np.asarray(step(x, pre.init(x), pre.default_params)[0], np.float64)
    if cfg["f0"] == "identity":
        np.testing.assert_array_equal(y, x64)
    elif cfg["f0"] == "mean":
        np.testing.assert_allclose(y, np.tile(x64.mean(0), (9, 1)), rtol=2e-5)
    else:
        assert bool(np.all(np.isfinite(y)))


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_update_keeps_the_input_dtype_and_wide_update_does_not(name):
    cfg = PRE[name]
    pre = aggregators.get_pre(name)(2, **cfg["params"])
    x = _x(9, jnp.bfloat16, seed=6)
    state = pre.init(x)
    y, _ = jax.jit(pre.update)(x, state, pre.default_params)
    wide, _ = jax.jit(pre.wide_update)(x, state, pre.default_params)
    assert y.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    np.testing.assert_array_equal(y, wide.astype(jnp.bfloat16))


STORED = sorted(
    name
    for name, cfg in RULES.items()
    if aggregators.build(name, f=cfg["f"], **cfg["params"]).stored
)


@pytest.mark.parametrize("pre", ["clipping", "bucketing"])
@pytest.mark.parametrize("name", STORED)
def test_chain_writes_computed_rows_out_once_for_a_stored_rule(name, pre):
    """A rule that reads its rows from memory gets a pre-aggregator's rows as one
    array written once (`write_rows`), not each row and then their copy, and the
    same aggregate as on the rows stored beforehand."""
    cfg = RULES[name]
    f = 2 if name == "mda" else cfg["f"]
    params = PRE[pre]["params"]
    agg = aggregators.build(name, f=f, pre=[(pre, params)], **cfg["params"])
    # One compilation for the temporaries and the aggregate: 1e5 columns make the
    # rows' copy (n_out (d,) vectors) stand far above the rest.
    n, d = 25, 100_000
    x = jnp.asarray(np.random.default_rng(8).normal(size=(n, d)), jnp.float32)
    fn = jax.jit(lambda x: agg.update(x, agg.init(x), agg.default_params)[0])
    compiled = fn.lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    pre_agg = aggregators.get_pre(pre)(f, **params)
    n_out = pre_agg.n_out(n)
    # The rows once, plus up to three (d,) vectors (a start, an iterate, the
    # result): a second copy of the rows would be n_out of them.
    assert temp < (n_out + 3) * d * 4, f"{temp / 1e6:.1f} MB of temporaries"
    rule = aggregators.build(name, f=f, **cfg["params"])
    rows, _ = jax.jit(pre_agg.wide_update)(x, pre_agg.init(x), params)
    want = jax.jit(lambda r: rule.update(r, rule.init(r), rule.default_params)[0])(rows)
    np.testing.assert_allclose(compiled(x), want, rtol=1e-6, atol=1e-6)


# NNM's output is one matrix product, an (n, d) float32 array of its own, and its
# fallback for non-finite rows a cleaned copy of x.
PRE_COPIES = {"nnm"}


@pytest.mark.parametrize("rule", ["median", "mean"])
@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_reads_bfloat16_without_a_float32_copy(name, rule, kernels_or_xla):
    """The chain in front of a rule that fuses computed rows: the pre-aggregator's
    rows stay inside the rule's loop, as in float32."""
    if name in PRE_COPIES:
        pytest.skip("documented exception")
    agg = aggregators.build(rule, f=2, pre=[(name, PRE[name]["params"])])
    n = 25
    x = jax.ShapeDtypeStruct((n, 1_000_000), jnp.bfloat16)
    fn = jax.jit(lambda x: agg.update(x, agg.init(x), agg.default_params)[0])
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * 1_000_000 * 2 / 2, f"{temp / 1e6:.1f} MB of temporaries"


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_pytree_equals_flat(name):
    cfg = PRE[name]
    x = _x(9, seed=6)
    tree = {"a": x[:, :2], "b": x[:, 2:].reshape(9, 2, 2)}
    out = byzjax.aggregate("median", tree, f=2, pre=[(name, cfg["params"])])
    flat = byzjax.aggregate("median", x, f=2, pre=[(name, cfg["params"])])
    np.testing.assert_array_equal(out["a"], flat[:2])
    np.testing.assert_array_equal(out["b"].reshape(-1), flat[2:])


@pytest.mark.parametrize("name", sorted(n for n in PRE if PRE[n]["bad"]))
def test_pre_precondition_error(name):
    cfg = PRE[name]
    (n, f), inequality = cfg["bad"]
    pre = aggregators.get_pre(name)(f, **cfg["params"])
    with pytest.raises(ValueError, match=_precondition_pattern(name, n, f, inequality)):
        jax.jit(lambda x: pre.update(x, pre.init(x), pre.default_params))(_x(n))


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_bad_arguments(name):
    cfg = PRE[name]
    for bad_f in (-1, 1.5):
        with pytest.raises(ValueError, match=re.escape(name)):
            aggregators.get_pre(name)(bad_f, **cfg["params"])
    for args in PRE_BAD_ARGS.get(name, []):
        with pytest.raises(ValueError, match=re.escape(name)):
            aggregators.get_pre(name)(2, **args)
    with pytest.raises(ValueError, match="unknown parameter.*bogus"):
        aggregators.build("median", f=2, pre=[(name, dict(cfg["params"], bogus=1))])


def test_downstream_rule_checks_its_precondition_on_n_out():
    # 9 workers in buckets of 2 -> 5 inputs; Krum with f = 2 needs 7.
    with pytest.raises(
        ValueError, match=_precondition_pattern("krum", 5, 2, "n >= 2f + 3")
    ):
        byzjax.aggregate("krum", _x(9), f=2, pre=[("bucketing", {"s": 2})])


def test_mda_refuses_above_the_subset_budget():
    with pytest.raises(ValueError, match=r"mda: .*n=50, f=12, C\(n, f\)=121399651100"):
        byzjax.aggregate("mda", jnp.zeros((50, 2)), f=12)
    with pytest.raises(ValueError, match=r"C\(n, f\)=36"):
        byzjax.aggregate("mda", jnp.zeros((9, 2)), f=2, max_subsets=35)


def _influence_inputs(n):
    # What the nan, inf, zero and mimic attacks send, and a square that overflows.
    x = _x(n, seed=4)
    return {
        "plain": x,
        "nan": x.at[0].set(jnp.nan),
        "+inf": x.at[1].set(jnp.inf),
        "1e38": x.at[0].set(1e38),
        "-inf entry": x.at[1, 2].set(-jnp.inf),
        "zero": x.at[:2].set(0.0),
        "equal": x.at[:3].set(x[4]),
    }


def _influence(agg, x):
    return diagnostics.aggregate_with_influence(
        agg.update, x, agg.init(x), agg.default_params
    )[2]


def _assert_influence_finite(agg, n):
    influence = jax.jit(lambda x: _influence(agg, x))  # one compile for all inputs
    for label, x in _influence_inputs(n).items():
        weights = np.asarray(influence(x))
        assert np.isfinite(weights).all(), (label, weights)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_influence_weights_are_finite(name):
    """The simulator's influence weights, a VJP through the rule, stay finite with
    the NaN, Inf, 1e38, zero and equal rows of the attacks (a reverse pass turns
    0 * Inf into NaN, and cannot go through a while loop)."""
    cfg = RULES[name]
    _assert_influence_finite(
        aggregators.build(name, f=cfg["f"], **cfg["params"]), cfg["n"]
    )


@pytest.mark.parametrize("name", sorted(PRE))
def test_pre_influence_weights_are_finite(name):
    agg = aggregators.build("mean", f=2, pre=[(name, PRE[name]["params"])])
    _assert_influence_finite(agg, 9)
