"""Every rule and pre-aggregator against the float64 NumPy oracle (tests/reference.py).

Fresh random inputs (an honest Gaussian cloud plus a tight Byzantine cluster at random
positions) over several (n, f, d), always through `jax.jit`, float32 and bfloat16,
with explicit tolerances.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import byzjax
from byzjax import aggregators
from byzjax.aggregators import _geometric
from byzjax.sim import diagnostics

# (n, f, d): odd and even n, d = 1 and d > n, every rule's precondition holds.
CONFIGS = [(7, 1, 5), (12, 2, 1), (15, 3, 17)]

# (rule, builder params, oracle params when they differ from the builder's).
GM_DEFAULT = {"init": "median", "nu": 1e-6, "relative_nu": True, "iterations": 8}

RULE_CASES = [
    ("mean", {}, None),
    ("median", {}, None),
    ("trimmed_mean", {}, None),
    ("trimmed_mean", {"b": 2}, None),
    ("mean_around_median", {}, None),
    ("mean_around_median", {"variant": "alie"}, None),
    ("mean_around_median", {"keep": 3}, None),
    ("krum", {}, None),
    ("krum", {"variant": "byzfl"}, None),
    ("krum", {"neighbors": 2}, None),
    ("multi_krum", {}, None),
    ("multi_krum", {"m": 3}, None),
    ("multi_krum", {"m": 4, "variant": "byzfl"}, None),
    ("bulyan", {}, None),
    ("geometric_median", {}, None),
    (
        "geometric_median",
        {"preset": "byzfl"},
        {"init": "zero", "nu": 0.1, "relative_nu": False, "iterations": 3},
    ),
    (
        "geometric_median",
        {"preset": "rfa"},
        {"init": "mean", "nu": 1e-6, "relative_nu": False, "iterations": 4},
    ),
    (
        "geometric_median",
        {"preset": "karimireddy"},
        {"init": "zero", "nu": 0.1, "relative_nu": False, "iterations": 8},
    ),
    # Both routes of the CPU kernels ("auto" takes the Gram one at these n).
    ("geometric_median", {"route": "direct"}, GM_DEFAULT),
    ("geometric_median", {"route": "gram"}, GM_DEFAULT),
    (
        "geometric_median",
        {"preset": "byzfl", "route": "direct"},
        {"init": "zero", "nu": 0.1, "relative_nu": False, "iterations": 3},
    ),
    (
        "geometric_median",
        {"preset": "rfa", "route": "direct"},
        {"init": "mean", "nu": 1e-6, "relative_nu": False, "iterations": 4},
    ),
    ("centered_clipping", {"tau": 1.0}, None),
    ("centered_clipping", {"tau": 0.5, "iterations": 3}, None),
    ("mda", {}, None),
    ("sign_majority", {}, None),
    ("sign_majority", {"zero_sign": 1}, None),
]

PRE_CASES = [
    ("nnm", {}),
    ("bucketing", {"s": 2, "shuffle": False}),
    ("bucketing", {"s": 3, "shuffle": False}),
    ("clipping", {"tau": 1.5}),
    ("arc", {}),
]

# Selection rules return an input row or the mean of a few, exactly up to float32
# rounding of the mean; iterative ones (Weiszfeld) accumulate a little more.
F32_TOL = {"geometric_median": 2e-4}
BF16_TOL = 2e-2


def make_inputs(seed, n, f, d, dtype=np.float32):
    """Honest N(0, 1) rows and f Byzantine rows clustered at +3, shuffled."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    bad = rng.choice(n, size=f, replace=False)
    x[bad] = 3.0 + 0.1 * rng.normal(size=(f, d))
    # Some exact zeros, so sign(0) conventions are exercised.
    x[rng.random(size=(n, d)) < 0.05] = 0.0
    x = jnp.asarray(x, dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def _seed(*parts):
    # crc32, not hash(): str hashes change between processes.
    return zlib.crc32(repr(parts).encode())


def _run_rule(name, f, params):
    agg = aggregators.build(name, f=f, **params)
    return jax.jit(lambda x: agg.update(x, agg.init(x), agg.default_params)[0])


@pytest.mark.parametrize("n,f,d", CONFIGS)
@pytest.mark.parametrize(
    "name,params,oracle_params", RULE_CASES, ids=lambda v: str(v) if v else ""
)
def test_rule_matches_oracle_float32(name, params, oracle_params, n, f, d):
    x, x64 = make_inputs(_seed(name, str(params), n), n, f, d)
    out = _run_rule(name, f, params)(x)
    expect = reference.RULES[name](x64, f, **(oracle_params or params))
    assert out.dtype == jnp.float32 and out.shape == (d,)
    tol = F32_TOL.get(name, 2e-5)
    np.testing.assert_allclose(np.asarray(out, np.float64), expect, rtol=tol, atol=tol)


# Rules that go through byzjax/_native on the CPU in float32: their pure-XLA forms
# (GPUs, no C++ compiler) against the same oracle.
NATIVE_RULES = {
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "centered_clipping",
    "mda",
    "sign_majority",
}
NATIVE_CASES = [case for case in RULE_CASES if case[0] in NATIVE_RULES]


@pytest.mark.parametrize(
    "name,params,oracle_params", NATIVE_CASES, ids=lambda v: str(v) if v else ""
)
def test_native_rules_match_oracle_without_the_cpu_kernels(
    name, params, oracle_params, monkeypatch
):
    monkeypatch.setenv("BYZJAX_NATIVE", "0")
    n, f, d = CONFIGS[2]
    x, x64 = make_inputs(_seed(name, str(params), "xla"), n, f, d)
    out = _run_rule(name, f, params)(x)
    expect = reference.RULES[name](x64, f, **(oracle_params or params))
    tol = F32_TOL.get(name, 2e-5)
    np.testing.assert_allclose(np.asarray(out, np.float64), expect, rtol=tol, atol=tol)


def test_nnm_matches_oracle_without_the_cpu_kernels(monkeypatch):
    monkeypatch.setenv("BYZJAX_NATIVE", "0")
    n, f, d = CONFIGS[2]
    x, x64 = make_inputs(_seed("nnm", "xla"), n, f, d)
    out = _run_pre("nnm", f, {})(x)
    np.testing.assert_allclose(
        np.asarray(out, np.float64), reference.PRE["nnm"](x64, f), rtol=2e-5, atol=2e-5
    )


BF16_RULES = sorted({name for name, _, _ in RULE_CASES})
BF16_PARAMS = {"centered_clipping": {"tau": 1.0}}
# Rules that read a bfloat16 input through byzjax/_native on the CPU.
BF16_KERNEL_RULES = [
    "bulyan",
    "centered_clipping",
    "geometric_median",
    "krum",
    "mda",
    "mean",
    "multi_krum",
    "sign_majority",
]
# More than 15 rows: bfloat16 rows are converted in groups of 15 (byzjax/_rows.py);
# more than 32: the networks' other forms.
BF16_WIDE = [(25, 5, 37), (40, 2, 19)]


@pytest.mark.parametrize("name", BF16_KERNEL_RULES)
def test_bfloat16_rules_match_oracle_without_the_cpu_kernels(name, monkeypatch):
    monkeypatch.setenv("BYZJAX_NATIVE", "0")
    n, f, d = CONFIGS[2]
    x, x64 = make_inputs(_seed(name, "bf16", "xla"), n, f, d, jnp.bfloat16)
    params = BF16_PARAMS.get(name, {})
    out = _run_rule(name, f, params)(x)
    np.testing.assert_allclose(
        np.asarray(out, np.float64),
        reference.RULES[name](x64, f, **params),
        rtol=BF16_TOL,
        atol=BF16_TOL,
    )


@pytest.mark.parametrize("n,f,d", CONFIGS[::2] + BF16_WIDE)
@pytest.mark.parametrize("name", BF16_RULES)
def test_rule_matches_oracle_bfloat16(name, n, f, d):
    params = BF16_PARAMS.get(name, {})
    x, x64 = make_inputs(_seed(name, "bf16", n), n, f, d, jnp.bfloat16)
    out = _run_rule(name, f, params)(x)
    assert out.dtype == jnp.bfloat16 and out.shape == (d,)
    # The oracle sees the same bfloat16-rounded inputs, in float64.
    expect = reference.RULES[name](x64, f, **params)
    np.testing.assert_allclose(
        np.asarray(out, np.float64), expect, rtol=BF16_TOL, atol=BF16_TOL
    )


def _run_pre(name, f, params):
    pre = aggregators.get_pre(name)(f, **params)
    return jax.jit(lambda x: pre.update(x, pre.init(x), pre.default_params)[0])


@pytest.mark.parametrize("n,f,d", CONFIGS)
@pytest.mark.parametrize("name,params", PRE_CASES, ids=str)
def test_pre_aggregator_matches_oracle(name, params, n, f, d):
    x, x64 = make_inputs(_seed(name, str(params), n), n, f, d)
    out = _run_pre(name, f, params)(x)
    oracle_params = {k: v for k, v in params.items() if k != "shuffle"}
    expect = reference.PRE[name](x64, f, **oracle_params)
    assert out.shape == expect.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out, np.float64), expect, rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("name", sorted(reference.PRE))
def test_pre_aggregator_matches_oracle_bfloat16(name):
    n, f, d = CONFIGS[2]
    params = {"clipping": {"tau": 1.5}, "bucketing": {"shuffle": False}}.get(name, {})
    x, x64 = make_inputs(_seed(name, "bf16"), n, f, d, jnp.bfloat16)
    pre = aggregators.get_pre(name)(f, **params)
    out = _run_pre(name, f, params)(x)
    # The rows a chain hands on: computed in float32 from the bfloat16 rows, not
    # rounded, so as close to the float64 oracle as in float32.
    wide = jax.jit(lambda x: pre.wide_update(x, pre.init(x), pre.default_params)[0])(x)
    assert out.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    params.pop("shuffle", None)
    expect = reference.PRE[name](x64, f, **params)
    np.testing.assert_allclose(
        np.asarray(out, np.float64), expect, rtol=BF16_TOL, atol=BF16_TOL
    )
    np.testing.assert_allclose(
        np.asarray(wide, np.float64), expect, rtol=2e-5, atol=2e-5
    )


def test_bucketing_shuffle_follows_the_documented_key_schedule():
    n, f, d, s, seed = 11, 2, 4, 3, 7
    x, x64 = make_inputs(1, n, f, d)
    pre = aggregators.get_pre("bucketing")(f, s=s, seed=seed)
    step = jax.jit(pre.update)
    state = pre.init(x)
    key = jax.random.PRNGKey(seed)
    seen = []
    for _ in range(3):
        out, state = step(x, state, pre.default_params)
        key, sub = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(sub, n))
        seen.append(tuple(perm))
        expect = reference.bucketing(x64, f, s=s, perm=perm)
        assert out.shape == (pre.n_out(n), d) == (4, d)
        np.testing.assert_allclose(np.asarray(out), expect, rtol=2e-5, atol=2e-5)
    assert len(set(seen)) == 3, "a fresh permutation every step"


@pytest.mark.parametrize("n,s", [(11, 2), (25, 2), (40, 3), (7, 4)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bucketing_written_form_matches_its_means(n, s, dtype):
    # A rule that reads its rows from memory gets bucketing's written form (on
    # the CPU kernels one sparse mixing pass): the same means as its fused form,
    # the same key schedule, and a non-finite row spoils its own bucket alone.
    x = np.random.default_rng(n + s).normal(size=(n, 1000)).astype(np.float32)
    x[2] = np.nan
    x[5, 7] = np.inf
    x = jnp.asarray(x).astype(dtype)
    pre = aggregators.get_pre("bucketing")(1, s=s, seed=3)
    state = pre.init(x)
    wide, wide_state = jax.jit(pre.wide_update)(x, state, ())
    written, written_state = jax.jit(pre.written_update)(x, state, ())
    assert written.dtype == wide.dtype == jnp.float32
    np.testing.assert_array_equal(written_state, wide_state)
    np.testing.assert_allclose(written, wide, rtol=1e-6, atol=1e-6)
    assert 1 <= (~np.isfinite(np.asarray(written))).any(axis=1).sum() <= 2


def test_centered_clipping_carries_its_centre():
    n, f, d = 9, 2, 6
    agg = aggregators.build("centered_clipping", f=f, tau=0.7, iterations=2)
    step = jax.jit(agg.update)
    x0, _ = make_inputs(2, n, f, d)
    state = agg.init(x0)
    assert state.shape == (d,)
    v = np.zeros(d)
    for seed in range(3):
        x, x64 = make_inputs(seed + 10, n, f, d)
        out, state = step(x, state, agg.default_params)
        v = reference.centered_clipping(x64, f, tau=0.7, iterations=2, v=v)
        np.testing.assert_allclose(np.asarray(out), v, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(state), v, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "rule,pre",
    [
        ("krum", ["nnm"]),
        ("median", ["arc"]),
        ("multi_krum", [("bucketing", {"s": 2, "shuffle": False})]),
        ("trimmed_mean", [("clipping", {"tau": 2.0}), "nnm"]),
        ("mean", ["arc"]),
        ("mean", ["nnm", ("clipping", {"tau": 2.0})]),
    ],
    ids=str,
)
def test_chain_matches_composed_oracle(rule, pre):
    n, f, d = 15, 3, 8
    if rule == "multi_krum":
        f = 1  # the rule sees ceil(15 / 2) = 8 buckets and needs 8 >= 2f + 3
    x, x64 = make_inputs(3, n, f, d)
    out = byzjax.aggregate(rule, x, f=f, pre=pre)
    y = x64
    for entry in pre:
        name, params = (entry, {}) if isinstance(entry, str) else entry
        params = {k: v for k, v in params.items() if k != "shuffle"}
        y = reference.PRE[name](y, f, **params)
    np.testing.assert_allclose(
        np.asarray(out), reference.RULES[rule](y, f), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize(
    "name,key,values,oracle_key",
    [
        ("centered_clipping", "tau", [0.25, 1.0, 4.0], "tau"),
        ("geometric_median", "nu", [1e-6, 0.5, 3.0], "nu"),
    ],
)
def test_sweepable_params_vmap(name, key, values, oracle_key):
    n, f, d = 9, 2, 5
    x, x64 = make_inputs(4, n, f, d)
    agg = aggregators.build(name, f=f, **({"tau": 1.0} if key == "tau" else {}))
    params = {key: jnp.asarray(values, jnp.float32)}
    run = jax.jit(jax.vmap(lambda p: agg.update(x, agg.init(x), p)[0]))
    out = run(params)
    extra = {"tau": 1.0} if key == "tau" else {}
    for row, value in zip(np.asarray(out), values, strict=True):
        expect = reference.RULES[name](x64, f, **dict(extra, **{oracle_key: value}))
        np.testing.assert_allclose(row, expect, rtol=2e-4, atol=2e-4)


def test_clipping_tau_vmaps():
    x, x64 = make_inputs(5, 6, 1, 4)
    pre = aggregators.get_pre("clipping")(1, tau=1.0)
    taus = jnp.asarray([0.5, 2.0])
    out = jax.jit(jax.vmap(lambda t: pre.update(x, (), {"tau": t})[0]))(taus)
    for row, tau in zip(np.asarray(out), [0.5, 2.0], strict=True):
        np.testing.assert_allclose(
            row, reference.clipping(x64, 1, tau=tau), rtol=2e-5, atol=2e-5
        )


def _gm_gram_check(x, preset):
    """gram_steps' accuracy flag on x, as the rule computes it."""
    init, nu, relative, iterations = _geometric.PRESETS[preset]
    x = jnp.asarray(x)
    centre = byzjax._numerics.coordinate_median(x) if init == "median" else None
    g, q = byzjax._native.gram(x, centre)
    floor = nu * max(1.0, float(np.median(np.sqrt(q)))) if relative else nu
    return bool(_geometric.gram_steps(g, init, jnp.float32(floor), iterations)[1])


@pytest.mark.skipif(not byzjax._native.enabled(), reason="the CPU kernels' route")
def test_geometric_median_gram_route_falls_back_when_inexact():
    # Rows sharing a mean 1e4 times their spread, ByzFL's zero start: the
    # uncentred Gram matrix cannot give their distances (its rounding is larger
    # than they are), so the route takes the direct steps, bit for bit.
    rng = np.random.default_rng(21)
    n, f, d = 9, 2, 1000
    x = (1e4 + rng.normal(size=(n, d))).astype(np.float32)
    assert not _gm_gram_check(x, "byzfl")
    gram = _run_rule("geometric_median", f, {"preset": "byzfl", "route": "gram"})(x)
    direct = _run_rule("geometric_median", f, {"preset": "byzfl", "route": "direct"})
    np.testing.assert_array_equal(gram, direct(x))
    want = reference.geometric_median(
        x.astype(np.float64), f, init="zero", nu=0.1, relative_nu=False, iterations=3
    )
    # Deviations from the shared mean (float32 resolves 1e4 to 1e-3).
    np.testing.assert_allclose(
        np.asarray(gram, np.float64) - 1e4, want - 1e4, atol=4e-3
    )


@pytest.mark.skipif(not byzjax._native.enabled(), reason="the CPU kernels' route")
@pytest.mark.parametrize("scale", [1e2, 1e8, 1e15])
def test_geometric_median_gram_route_exact_with_far_byzantine_rows(scale):
    # Centred on the coordinate-wise median, the Gram matrix stays exact however
    # far the Byzantine rows are (the pairwise-distance identity lost up to 75 %
    # of the honest distances at 1e8): the route keeps it and matches the oracle.
    rng = np.random.default_rng(int(np.log10(scale)))
    n, f, d = 11, 3, 2000
    x = (2.0 + rng.normal(size=(n, d))).astype(np.float32)
    x[:f] = scale * rng.normal(size=(f, d))
    assert _gm_gram_check(x, "byzjax")
    out = _run_rule("geometric_median", f, {"route": "gram"})(x)
    want = reference.geometric_median(x.astype(np.float64), f, **GM_DEFAULT)
    tol = F32_TOL["geometric_median"]
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("preset", ["byzjax", "byzfl"])
def test_geometric_median_gram_route_kept_on_ordinary_rows(preset):
    # The inputs of the oracle tests: the Gram route is the one they check.
    x, _ = make_inputs(_seed("gm-route", preset), 25, 5, 200)
    assert _gm_gram_check(x, preset)


@pytest.mark.parametrize("preset", ["byzjax", "byzfl"])
def test_geometric_median_routes_differentiate_alike(preset):
    # The same iteration computed two ways: the same influence weights (the
    # simulator's VJP), through the Gram matrix's and the step kernel's rules.
    x, _ = make_inputs(_seed("gm-vjp", preset), 11, 2, 300)
    weights = {}
    for route in ("gram", "direct"):
        agg = aggregators.build("geometric_median", f=2, preset=preset, route=route)
        # Jitted, as in the simulator (run op by op, it took 11.7 s against 4 s).
        influence = jax.jit(
            lambda x, a=agg: diagnostics.aggregate_with_influence(
                a.update, x, a.init(x), a.default_params
            )[2]
        )
        weights[route] = influence(x)
    np.testing.assert_allclose(weights["gram"], weights["direct"], rtol=1e-4, atol=1e-6)
    if preset == "byzjax":  # the median start keeps it translation equivariant
        np.testing.assert_allclose(float(weights["gram"].sum()), 1.0, rtol=1e-4)
