"""Attacks against the float64 NumPy oracle (through jax.jit) and SPEC's examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_attacks as ref

import byzjax
from byzjax import _numerics as nm
from byzjax import attacks

SHAPES = [(3, 1, 2), (7, 2, 5), (12, 5, 33)]  # (h, f, d)
KEY = jax.random.PRNGKey(0)


def honest(h, d, seed, scale=1.0, shift=0.3):
    rng = np.random.default_rng(seed)
    return shift + scale * rng.standard_normal((h, d))


def run(name, H, f, key=KEY, **params):
    """Attack `name` under jit (cached per configuration) in float32, as float64."""
    out = attacks.one_shot(name, f=f, **params)(key, jnp.asarray(H, jnp.float32))
    assert out.shape == (f, H.shape[1]) and out.dtype == jnp.float32
    return np.asarray(out, np.float64)


def close(actual, expected, rtol=2e-5, atol=2e-5):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------------- z_max

Z_TABLE = [  # SPEC 2.1: (n, f, paper, karimireddy), 4 decimals
    (50, 12, 0.5828, 0.3360),
    (25, 12, 1.7507, 1.4261),
    (25, 6, 0.5828, 0.3360),
    (51, 12, 0.5992, 0.3612),
    (50, 24, 1.7507, 1.4261),
]


@pytest.mark.parametrize("n,f,paper,karimireddy", Z_TABLE)
def test_z_max_spec_table(n, f, paper, karimireddy):
    assert round(attacks.z_max(n, f), 4) == paper
    assert round(attacks.z_max(n, f, form="paper"), 4) == paper
    assert round(attacks.z_max(n, f, form="karimireddy"), 4) == karimireddy


def test_z_max_against_scipy_and_guards():
    for n in range(3, 40):
        for f in range(0, n // 2 + 1):
            for form in ("paper", "karimireddy"):
                got, want = attacks.z_max(n, f, form), ref.z_max(n, f, form)
                assert isinstance(got, float)
                assert got == want or math.isclose(got, want, rel_tol=1e-9)
    assert attacks.z_max(10, 6) == math.inf  # s = 6 - 6 = 0
    assert attacks.z_max(10, 9, "karimireddy") == math.inf
    with pytest.raises(ValueError, match="f < n"):
        attacks.z_max(5, 5)
    with pytest.raises(ValueError, match="form"):
        attacks.z_max(5, 1, form="blades")
    with pytest.raises(ValueError, match="int"):
        attacks.z_max(5.5, 1)


# ------------------------------------------------------------------ SPEC examples


def test_spec_alie_example():
    H = np.array([[1, -1], [2, 0], [3, 1.0]])
    close(run("alie", H, 2, z=1.0, ddof=1), [[1, -1]] * 2)
    close(run("alie", H, 2, z=1.0), [[1.183503, -0.816497]] * 2, atol=1e-6)


def test_spec_ipm_example():
    H = np.array([[1, -1], [2, 0], [3, 1.0]])  # mean (2, 0)
    close(run("ipm", H, 3, eps=0.5), [[-1, 0]] * 3)


def test_spec_min_max_min_sum_example():
    B = np.array([[1, 0], [0, 1], [1, 1.0]])
    close(run("min_max", B, 1), [[0, 0]], atol=1e-6)
    # gamma from u = mu - gamma * p along p = (1, 1)/sqrt(2)
    mu = B.mean(0)

    def gamma(u):
        return float(np.linalg.norm(mu - u[0]))

    assert gamma(run("min_max", B, 1)) == pytest.approx(2 * math.sqrt(2) / 3, abs=1e-6)
    authors = gamma(run("min_max", B, 1, search="authors"))
    assert authors == pytest.approx(0.942802, abs=2e-6)
    assert authors == pytest.approx(ref.min_max(B, 1, search="authors")[1], abs=1e-6)
    close(run("min_sum", B, 1), [[1 / 3, 1 / 3]], atol=1e-6)
    assert gamma(run("min_sum", B, 1)) == pytest.approx(math.sqrt(2) / 3, abs=1e-6)
    got = gamma(run("min_sum", B, 1, bound="max"))
    assert got == pytest.approx(math.sqrt(5) / 3, abs=1e-6)


# ------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("h,f,d", SHAPES)
def test_alie_matches_oracle(h, f, d):
    H = honest(h, d, seed=h * 100 + d)
    close(run("alie", H, f), ref.alie(H, f))
    close(run("alie", H, f, form="karimireddy"), ref.alie(H, f, form="karimireddy"))
    close(run("alie", H, f, z=1.3, ddof=1), ref.alie(H, f, z=1.3, ddof=1))
    close(run("alie", H, f, z=-0.7), ref.alie(H, f, z=-0.7))


@pytest.mark.parametrize(
    "native,dtype", [("1", np.float32), ("1", jnp.bfloat16), ("0", np.float32)]
)
def test_mean_std_matches_numpy_on_both_paths(native, dtype, monkeypatch):
    # The moments kernel (native) and the XLA product plus fused deviations, on
    # columns near 1e3 with spread 1, and a NaN, an Inf and a 1e38 column. The
    # attacks widen bfloat16 before this; the kernel also reads it as it is.
    monkeypatch.setenv("BYZJAX_NATIVE", native)
    rng = np.random.default_rng(int(native))
    x = (rng.normal(size=(9, 1000)) + 1e3 * (1 + rng.random(1000))).astype(dtype)
    x[2, :3] = np.array([np.nan, np.inf, 1e38], np.float32).astype(dtype)
    x64 = np.asarray(x, np.float32).astype(np.float64)
    for ddof in (0, 1):
        mu, sigma = jax.jit(lambda x, ddof=ddof: nm.mean_std(x, ddof))(x)
        with np.errstate(invalid="ignore", over="ignore"):  # m2 is float32: 1e38 -> Inf
            m2 = ((x64 - x64.mean(0)) ** 2).sum(0).astype(np.float32)
            want = np.sqrt(m2.astype(np.float64) / (9 - ddof))
        np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(sigma, want, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("h,f,d", SHAPES)
def test_mean_based_attacks_match_oracle(h, f, d):
    H = honest(h, d, seed=h * 101 + d)
    close(run("ipm", H, f), ref.ipm(H, f, 0.1))
    close(run("ipm", H, f, eps=7.5), ref.ipm(H, f, 7.5))
    close(run("sign_flip", H, f), ref.sign_flip_mean(H, f))
    close(run("large_opposite", H, f, lam=1e3), ref.large_opposite(H, f, 1e3))
    close(
        run("large_opposite", H, f, reduce="mean"),
        ref.large_opposite(H, f, 1e10, "mean"),
    )
    close(run("mimic", H, f, target=h - 1), ref.mimic(H, f, h - 1))
    for name, value in (("zero", 0.0), ("inf", np.inf), ("nan", np.nan)):
        np.testing.assert_array_equal(run(name, H, f), ref.constant(H, f, value))


def test_sign_flip_own_and_xie():
    H = honest(5, 4, seed=1)
    own = honest(3, 4, seed=2)
    for variant, want in (("own", -own), ("xie", ref.tile(-own[0], 3))):
        atk = attacks.build("sign_flip", variant=variant)
        fn = jax.jit(lambda k, x, p, a=atk: a.apply(k, x, p, 3))
        close(np.asarray(fn(KEY, jnp.asarray(H), {"own": jnp.asarray(own)})), want)
        with pytest.raises(ValueError, match="own"):
            atk.apply(KEY, jnp.asarray(H), atk.default_params, 3)
        with pytest.raises(ValueError, match="own"):
            atk.apply(KEY, jnp.asarray(H), {"own": jnp.zeros((2, 4))}, 3)


@pytest.mark.parametrize(
    "h,f,d,kind", [(12, 5, 33, "unit_vec"), (7, 2, 5, "std"), (3, 1, 2, "sign")]
)
def test_min_max_min_sum_match_oracle(h, f, d, kind):
    H = honest(h, d, seed=h * 7 + d)
    close(run("min_max", H, f, perturbation=kind), ref.min_max(H, f, kind)[0])
    for bound in ("min", "max"):
        want = ref.min_sum(H, f, kind, bound)[0]
        close(run("min_sum", H, f, perturbation=kind, bound=bound), want)
    want = ref.min_max(H, f, kind, search="authors", gamma_init=10.0)[0]
    close(run("min_max", H, f, perturbation=kind, search="authors"), want, atol=5e-5)


def test_min_max_authors_search_is_capped_by_gamma_init():
    H = honest(6, 3, seed=5, scale=10.0)
    exact = ref.min_max(H, 1)[1]
    assert exact > 3.0  # the cap below is binding
    out = run("min_max", H, 1, search="authors", gamma_init=1.0)
    gamma = np.linalg.norm(H.mean(0) - out[0])
    assert gamma == pytest.approx(ref.min_max(H, 1, "unit_vec", "authors", 1.0)[1])
    assert gamma < 2.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fang_trimmed_mean_draws_inside_oracle_interval(seed):
    h, f, d = 7, 40, 64
    # shift in {-1, 0, 1} per coordinate so all four interval cases occur
    H = honest(h, d, seed) + np.random.default_rng(seed + 9).integers(-1, 2, d)
    lo, hi = ref.fang_trimmed_mean_interval(H)
    cases = [(H.mean(0) > 0) & (H.min(0) > 0), (H.mean(0) > 0) & (H.min(0) <= 0)]
    cases += [(H.mean(0) <= 0) & (H.max(0) > 0), (H.mean(0) <= 0) & (H.max(0) <= 0)]
    assert all(c.any() for c in cases)
    out = run("fang", H, f, key=jax.random.PRNGKey(seed))
    tol = 1e-5 * (1 + np.abs(lo) + np.abs(hi))
    assert np.all(out >= lo - tol) and np.all(out <= hi + tol)
    # the draws are independent and cover the interval
    width = hi - lo
    assert np.all(out.max(0) - out.min(0) > 0.7 * width)
    # gradients are pushed to the side opposite to the honest mean
    assert np.all(np.where(H.mean(0) > 0, out <= H.min(0) + tol, out >= H.max(0) - tol))
    out_b = run("fang", H, f, key=jax.random.PRNGKey(seed), b=3.0)
    lo3, hi3 = ref.fang_trimmed_mean_interval(H, b=3.0)
    assert np.all(out_b >= lo3 - tol * 3) and np.all(out_b <= hi3 + tol * 3)


@pytest.mark.parametrize("h,f,d", [(7, 2, 5), (9, 3, 16)])
def test_fang_krum_matches_oracle(h, f, d):
    if "krum" not in byzjax.aggregators.names():
        pytest.skip("krum is not registered yet")
    lam_max_fn = jax.jit(attacks.fang_krum_lambda_max, static_argnums=1)
    for seed in range(4):
        H = honest(h, d, seed=seed + 31 * d, shift=0.0)
        lam_max = float(lam_max_fn(jnp.asarray(H, jnp.float32), f))
        assert lam_max == pytest.approx(ref.fang_krum_lambda_max(H, f), rel=1e-5)
        want, lam = ref.fang_krum(H, f)
        got = run("fang", H, f, variant="krum")
        close(got, want, rtol=1e-4)
        X = np.concatenate([got, H])
        if lam >= 1e-5:  # the attack found a lambda at which Krum selects it
            close(ref.krum(X, f), got[0], rtol=1e-4)


def test_gaussian_statistics():
    H = honest(5, 3, seed=3)
    out = run("gaussian", H, 4000, key=jax.random.PRNGKey(4))
    assert abs(out.mean()) < 200 * 5 / math.sqrt(out.size)
    assert out.std() == pytest.approx(200.0, rel=0.03)
    assert np.abs(np.corrcoef(out[:, 0], out[:, 1])[0, 1]) < 0.06
    assert len(np.unique(out, axis=0)) == out.shape[0]  # independent rows
    centred = run("gaussian", H, 4000, key=jax.random.PRNGKey(4), center="mean")
    np.testing.assert_allclose(centred - out, ref.tile(H.mean(0), 4000), atol=1e-3)
    small = run("gaussian", H, 4000, key=jax.random.PRNGKey(4), sigma=2.0)
    np.testing.assert_allclose(small, out / 100, rtol=1e-5, atol=1e-5)


def test_vmap_sweep_matches_oracle():
    H = honest(6, 4, seed=8)
    zs = np.array([0.0, 0.5, 1.5])
    atk = attacks.build("alie", z=0.0)
    sweep = jax.jit(
        jax.vmap(lambda p: atk.apply(KEY, jnp.asarray(H, jnp.float32), p, 2))
    )({"z": jnp.asarray(zs, jnp.float32)})
    for i, z in enumerate(zs):
        close(np.asarray(sweep[i], np.float64), ref.alie(H, 2, z=z))


def test_mimic_heuristic_matches_oracle():
    h, f, d, warmup = 6, 2, 5, 3
    rng = np.random.default_rng(11)
    steps = [rng.standard_normal((h, d)) + rng.standard_normal(d) for _ in range(6)]
    atk = attacks.mimic_heuristic(warmup=warmup, seed=3)
    state = atk.init(jnp.asarray(steps[0], jnp.float32))
    z0 = np.asarray(state.z, np.float64)
    want = ref.mimic_heuristic(steps, warmup, z0, f)
    step = jax.jit(lambda x, s: atk.apply(KEY, x, s, {}, f))
    for t, H in enumerate(steps):
        out, state = step(jnp.asarray(H, jnp.float32), state)
        close(np.asarray(out, np.float64), want[t])
    assert int(state.t) == len(steps)


def test_mimic_target_out_of_range():
    with pytest.raises(ValueError, match="target"):
        byzjax.attack("mimic", KEY, jnp.ones((3, 2)), f=1, target=3)
    with pytest.raises(ValueError, match="target"):
        attacks.build("mimic", target=-1)


# ------------------------------------------------------------------------- rule-aware


def _dense_best(objective, lo, hi, num, log):
    grid = np.geomspace(lo, hi, num) if log else np.linspace(lo, hi, num)
    return min(objective(c) for c in grid)


@pytest.mark.parametrize("seed", [0, 1])
def test_alie_opt_and_ipm_opt_against_median(seed):
    if "median" not in byzjax.aggregators.names():
        pytest.skip("median is not registered yet")
    h, f, d = 9, 4, 6
    H = honest(h, d, seed=seed + 50, shift=0.1)
    g = H.mean(0)
    mu, sigma = H.mean(0), H.std(0)

    def obj_alie(z):
        return g @ np.median(np.concatenate([ref.tile(mu - z * sigma, f), H]), 0)

    def obj_ipm(eps):
        return g @ np.median(np.concatenate([ref.tile(-eps * g, f), H]), 0)

    out = run("alie_opt", H, f, rule="median")
    z = float(np.median((mu - out[0]) / sigma))
    np.testing.assert_allclose(out, ref.alie(H, f, z=z), atol=1e-5)
    best = _dense_best(obj_alie, 0.0, 4.0, 4001, False)
    assert obj_alie(z) <= best + 1e-4 * (1 + abs(best))
    assert obj_alie(z) < obj_alie(0.0)

    out = run("ipm_opt", H, f, rule="median")
    eps = float(-(out[0] @ g) / (g @ g))
    np.testing.assert_allclose(out, ref.ipm(H, f, eps), atol=1e-5)
    best = _dense_best(obj_ipm, 0.01, 100.0, 4001, True)
    assert obj_ipm(eps) <= best + 1e-4 * (1 + abs(best))


def test_rule_aware_attacks_accept_aggregators_and_reject_unknown_rules():
    agg = byzjax.aggregators.build("mean", f=2)
    H = honest(5, 3, seed=4)
    out = run("ipm_opt", H, 2, rule=agg, lo=0.5, hi=8.0)
    # against the mean <ḡ, A> decreases with eps: the search ends at hi
    close(out, ref.ipm(H, 2, 8.0), rtol=1e-4)
    with pytest.raises(ValueError, match="unknown aggregator"):
        attacks.build("alie_opt", rule="no_such_rule")
    with pytest.raises(ValueError, match="unknown aggregator"):
        attacks.build("fang", variant="krum", rule="no_such_rule")
    with pytest.raises(ValueError, match="0 < lo < hi"):
        attacks.build("ipm_opt", lo=0.0)
    with pytest.raises(ValueError, match="lo < hi"):
        attacks.build("alie_opt", lo=2.0, hi=1.0)


# ------------------------------------------------------------------------- poisoning


def test_poisoning_registry():
    assert attacks.poisoning_names() == ("backdoor", "label_flip")
    with pytest.raises(ValueError, match="valid names"):
        attacks.get_poisoning("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        attacks.build_poisoning("backdoor", colour=1)


def test_label_flip():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 32)
    x = rng.standard_normal((32, 8))
    p = attacks.build_poisoning("label_flip")
    fn = jax.jit(lambda k, a, b: p.apply(k, a, b, p.default_params, 10))
    x2, y2 = fn(KEY, jnp.asarray(x), jnp.asarray(y, jnp.int32))
    np.testing.assert_array_equal(np.asarray(y2), ref.label_flip(y, 10))
    np.testing.assert_array_equal(np.asarray(x2), np.asarray(jnp.asarray(x)))
    assert y2.dtype == jnp.int32


@pytest.mark.parametrize(
    "layout,corner",
    [("bhwc", "top_left"), ("bhw", "bottom_right"), ("flat", "top_right")],
)
def test_backdoor(layout, corner):
    rng = np.random.default_rng(1)
    imgs = rng.uniform(0, 1, (6, 10, 9, 3) if layout == "bhwc" else (6, 10, 9))
    y = rng.integers(0, 10, 6)
    shape = None
    x = imgs
    if layout == "flat":
        x, shape = imgs.reshape(6, -1), (10, 9)
    p = attacks.build_poisoning(
        "backdoor", target=7, size=3, corner=corner, value=2.5, image_shape=shape
    )
    fn = jax.jit(lambda k, a, b: p.apply(k, a, b, p.default_params, 10))
    x2, y2 = fn(KEY, jnp.asarray(x, jnp.float32), jnp.asarray(y))
    want = np.stack([ref.backdoor_image(im, 3, corner, 2.5) for im in imgs])
    np.testing.assert_allclose(np.asarray(x2).reshape(want.shape), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y2), np.full(6, 7))


def test_backdoor_fraction_and_default_value():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (400, 6, 6))
    y = rng.integers(0, 3, 400)
    p = attacks.build_poisoning("backdoor", target=1, size=2, fraction=0.25)
    fn = jax.jit(lambda k, a, b: p.apply(k, a, b, p.default_params, 3))
    x2, y2 = fn(KEY, jnp.asarray(x), jnp.asarray(y))
    x2 = np.asarray(x2, np.float64)
    changed = np.any(np.abs(x2 - x) > 1e-7, axis=(1, 2))
    assert 0.18 < changed.mean() < 0.32
    assert np.all(np.asarray(y2)[changed] == 1)
    np.testing.assert_array_equal(np.asarray(y2)[~changed], y[~changed])
    np.testing.assert_allclose(x2[changed][:, :2, :2], np.float32(x.max()), rtol=1e-6)


def test_poison_workers_only_touches_byzantine():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 5, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (4, 5)), jnp.int32)
    mask = jnp.array([True, False, False, True])
    p = attacks.build_poisoning("label_flip")
    fn = jax.jit(
        lambda k, a, b, m: attacks.poison_workers(p, k, a, b, m, p.default_params, 10)
    )
    x2, y2 = fn(KEY, x, y, mask)
    np.testing.assert_array_equal(x2, x)
    want = np.where(np.asarray(mask)[:, None], 9 - np.asarray(y), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(y2), want)


def test_optimized_attacks_evaluate_the_rules_form_for_computed_rows():
    # The candidate rows are built inside the attack, so the rule's
    # `fused_update` runs (here the mean; its `update` would return zeros).
    from byzjax.aggregators import Aggregator
    from byzjax.attacks._optimized import aggregate_with

    def zeros(x, state, params):
        return jnp.zeros(x.shape[1], x.dtype), state

    def mean(x, state, params):
        return x.mean(0), state

    rng = np.random.default_rng(5)
    byz = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)
    honest = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    out = jax.jit(
        lambda b, h: aggregate_with(Aggregator(lambda x: (), zeros, (), mean), b, h)
    )(byz, honest)
    want = np.concatenate([byz, honest]).astype(np.float64).mean(0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)


# Each attack on one dtype (each case compiles the stacked form's network too).
@pytest.mark.parametrize(
    "name,dtype", [("alie_opt", jnp.float32), ("ipm_opt", jnp.bfloat16)]
)
@pytest.mark.parametrize(
    "target,shapes",
    [("median", ((10, 3), (19, 7))), ("trimmed_mean", ((30, 8),))],
)
def test_rule_aware_attacks_through_copies_give_the_stacked_rows_bits(
    name, dtype, target, shapes
):
    # Against the median and (above 32 rows) the trimmed mean the searches
    # evaluate each candidate off the honest order statistics (`copies_update`)
    # instead of a network over the stacked rows: the same objective values, so
    # the same factor and the same bits. On ties (small integers), a non-finite
    # honest row, odd and even n.
    from byzjax import aggregators

    rng = np.random.default_rng(5)
    for h, f in shapes:
        x = rng.normal(size=(h, 203)).astype(np.float32)
        x[:, :60] = rng.integers(-2, 3, size=(h, 60))
        x[h // 2, 100:110] = np.inf
        x = jnp.asarray(x, dtype)
        stacked = aggregators.build(target, f=f)._replace(copies_update=None)
        outs = []
        for rule in (target, stacked):
            attack = attacks.get(name)(rule=rule)
            fn = jax.jit(lambda k, x, p, a=attack, f=f: a.apply(k, x, p, f))
            outs.append(np.asarray(fn(KEY, x, attack.default_params), np.float32))
        np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
