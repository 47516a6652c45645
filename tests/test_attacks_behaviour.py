"""The papers' mechanisms on synthetic gradients: small mean, large spread.

Honest gradients are ``x_i = g + xi_i`` with ``xi_i ~ N(0, I)`` and ``|g_j| <
1/sqrt(h - 1)``: the regime of the ALIE and Fall of Empires papers, where the honest
coordinates straddle zero. Every test runs a batch of seeded trials through one
vmapped, jitted program and asserts on rates, with a control that the same assertion
fails without the attack (so the tests can fail).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byzjax import aggregators, attacks

TRIALS = 16


def honest_batch(h, d, seed, trials=TRIALS):
    """(trials, h, d) honest gradients, |g_j| = 0.5 / sqrt(h - 1), unit spread."""
    rng = np.random.default_rng(seed)
    g = 0.5 / np.sqrt(h - 1) * rng.choice([-1.0, 1.0], (trials, 1, d))
    return jnp.asarray(g + rng.standard_normal((trials, h, d)), jnp.float32)


def attacked(rule, attack, f, **rule_params):
    """jit(vmap(x -> (byzantine rows, aggregate of byzantine + honest rows)))."""
    agg = aggregators.build(rule, f=f, **rule_params)

    def one(x):
        byz = attack.apply(jax.random.PRNGKey(0), x, attack.default_params, f)
        allx = jnp.concatenate([byz, x], axis=0)
        return byz, agg.update(allx, agg.init(allx), agg.default_params)[0]

    return jax.jit(jax.vmap(one))


def inner(x, a):
    """<mean of the honest rows, aggregate>, per trial."""
    return np.einsum("td,td->t", np.asarray(x.mean(1)), np.asarray(a))


def test_ipm_large_eps_turns_the_median_against_the_honest_mean():
    h, f, d = 11, 8, 64
    x = honest_batch(h, d, seed=1)
    _, a = attacked("median", attacks.build("ipm", eps=20.0), f)(x)
    assert np.mean(inner(x, a) < 0) >= 0.9
    _, a0 = attacked("median", attacks.build("ipm", eps=-1.0), f)(x)  # u = ḡ: no attack
    assert np.mean(inner(x, a0) < 0) <= 0.1


def test_ipm_small_eps_wins_krum():
    h, f, d = 12, 5, 64
    x = honest_batch(h, d, seed=2)
    byz, a = attacked("krum", attacks.build("ipm", eps=0.1), f)(x)
    picked = np.all(np.isclose(np.asarray(a), np.asarray(byz[:, 0])), axis=1)
    assert picked.mean() >= 0.95
    assert np.all(inner(x, a)[picked] < 0)
    byz, a = attacked("krum", attacks.build("ipm", eps=20.0), f)(x)  # an outlier
    picked = np.all(np.isclose(np.asarray(a), np.asarray(byz[:, 0])), axis=1)
    assert picked.mean() == 0.0


ALIE_N, ALIE_F, ALIE_D = 25, 5, 128


@pytest.fixture(scope="module")
def alie_setting():
    h = ALIE_N - ALIE_F
    x = honest_batch(h, ALIE_D, seed=3, trials=8)
    z = attacks.z_max(ALIE_N, ALIE_F)
    assert z == pytest.approx(0.4677, abs=1e-4)
    return x, z


def shift_in_sigmas(x, a):
    """Mean over trials and coordinates of (mu_j - A_j) / sigma_j."""
    mu, sigma = np.asarray(x.mean(1)), np.asarray(x.std(1))
    return float(np.mean((mu - np.asarray(a)) / sigma))


@pytest.mark.parametrize("rule", ["krum", "trimmed_mean", "bulyan"])
def test_alie_moves_the_rule_by_a_fraction_of_z_sigma(alie_setting, rule):
    x, z = alie_setting
    byz, a = attacked(rule, attacks.build("alie"), ALIE_F)(x)
    shift = shift_in_sigmas(x, a)
    if rule == "krum":  # Krum picks the f identical ALIE rows: a shift of exactly z
        np.testing.assert_allclose(np.asarray(a), np.asarray(byz[:, 0]), atol=1e-6)
        assert shift == pytest.approx(z, rel=1e-4)
    else:
        assert 0.2 * z < shift < 1.2 * z
    _, a0 = attacked(rule, attacks.build("alie", z=0.0), ALIE_F)(x)  # control
    assert abs(shift_in_sigmas(x, a0)) < 0.1 * z
    # ... while the ALIE row stays inside the honest spread: within every
    # coordinate's honest range, and closer to the mean than a typical honest row.
    u = np.asarray(byz[:, 0])
    lo, hi = np.asarray(x.min(1)), np.asarray(x.max(1))
    assert np.mean((u >= lo) & (u <= hi)) > 0.99
    mu = np.asarray(x.mean(1))
    honest_dist = np.median(np.linalg.norm(np.asarray(x) - mu[:, None], axis=2), 1)
    assert np.all(np.linalg.norm(u - mu, axis=1) < honest_dist)


def test_alie_opt_does_at_least_as_well_as_z_max(alie_setting):
    x, z = alie_setting
    _, a_opt = attacked(
        "trimmed_mean", attacks.build("alie_opt", rule="trimmed_mean"), ALIE_F
    )(x)
    _, a_zmax = attacked("trimmed_mean", attacks.build("alie"), ALIE_F)(x)
    ip_opt, ip_zmax = inner(x, a_opt), inner(x, a_zmax)
    assert np.all(ip_opt <= ip_zmax + 1e-4 * np.abs(ip_zmax))
    assert np.mean(ip_opt) < np.mean(ip_zmax)


def test_fang_and_min_max_pull_the_aggregate_against_the_honest_mean():
    h, f, d = 14, 5, 64
    x = honest_batch(h, d, seed=4)
    _, clean = attacked("trimmed_mean", attacks.build("ipm", eps=-1.0), f)(x)
    base = inner(x, clean)
    for name, rule in (("fang", "trimmed_mean"), ("fang", "median")):
        _, a = attacked(rule, attacks.build(name), f)(x)
        assert np.all(inner(x, a) < base), (name, rule)
    _, a = attacked("krum", attacks.build("fang", variant="krum"), f)(x)
    assert np.mean(inner(x, a) < 0) >= 0.9
    byz, a = attacked("trimmed_mean", attacks.build("min_max"), f)(x)
    assert np.all(inner(x, a) < base)
    # min-max stays within the honest diameter (its constraint)
    u = np.asarray(byz[:, 0])
    far = np.max(np.linalg.norm(np.asarray(x) - u[:, None], axis=2), 1)
    xs = np.asarray(x)
    diam = np.max(np.linalg.norm(xs[:, :, None] - xs[:, None], axis=3), axis=(1, 2))
    assert np.all(far <= diam * (1 + 1e-5))
