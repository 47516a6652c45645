"""The contract every registered gradient attack meets, driven by the registry.

A new attack is tested the moment it is registered, once it has an entry in `CASES`
(a test fails while it has none): output shape (f, d) and dtype, one trace under jit,
a vmap over its params (or over keys when it has none) that agrees with unbatched
calls, pytree inputs through `byzjax.attack`, and clear ValueErrors.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import byzjax
from byzjax import attacks

H, F, D = 7, 3, 6  # n = 10 >= 2f + 3, so Krum-targeting attacks apply


class Case(NamedTuple):
    kwargs: dict  # builder arguments
    sweep: dict | None  # params with a leading batch axis; None: vmap over keys
    finite: bool = True  # finite honest input gives finite output


CASES = {
    "alie": [Case({}, {"z": [0.0, 0.5, 2.0]}), Case({"z": 1.0, "ddof": 1}, None)],
    "alie_opt": [Case({"rule": "trimmed_mean"}, {"lo": [0.0, 1.0], "hi": [2.0, 4.0]})],
    "fang": [
        Case({}, {"b": [1.5, 2.0, 4.0]}),
        Case({"variant": "krum", "halvings": 12}, {"lam_min": [1e-5, 1e-2]}),
    ],
    "gaussian": [Case({"center": "mean"}, {"sigma": [0.0, 1.0, 200.0]})],
    "inf": [Case({}, None, finite=False)],
    "ipm": [Case({}, {"eps": [0.1, 1.0, 100.0]})],
    "ipm_opt": [Case({"rule": "krum"}, {"lo": [0.01, 0.1], "hi": [10.0, 100.0]})],
    "large_opposite": [Case({"reduce": "mean"}, {"lam": [1.0, 1e3, 1e10]})],
    "mimic": [Case({"target": 2}, {"target": [0, 3, 6]})],
    "min_max": [
        Case({"perturbation": "std"}, None),
        Case({"search": "authors"}, {"gamma_init": [1.0, 10.0, 50.0]}),
    ],
    "min_sum": [Case({"perturbation": "sign", "bound": "max"}, None)],
    "nan": [Case({}, None, finite=False)],
    "sign_flip": [
        Case({}, None),
        Case({"variant": "own"}, {"own": np.arange(2 * F * D).reshape(2, F, D)}),
    ],
    "zero": [Case({}, None)],
}

PARAMS = [
    pytest.param(name, i, id=f"{name}-{i}")
    for name in sorted(CASES)
    for i in range(len(CASES[name]))
]


def honest(seed=0, h=H, d=D):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((h, d)) + 0.2, jnp.float32)


def default_params(name, atk, case):
    """The attack's default params, with any required array (own) filled in."""
    if case.sweep is not None and "own" in case.sweep:
        return {"own": jnp.asarray(case.sweep["own"][0], jnp.float32)}
    return atk.default_params


def test_every_registered_attack_has_a_case():
    missing = sorted(set(attacks.names()) - set(CASES))
    assert not missing, f"add contract cases for: {missing}"
    assert not sorted(set(CASES) - set(attacks.names())), "stale contract cases"


@pytest.mark.parametrize("name,i", PARAMS)
def test_shape_dtype_and_single_trace(name, i):
    case = CASES[name][i]
    atk = attacks.build(name, **case.kwargs)
    params = default_params(name, atk, case)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, x):
        return atk.apply(key, x, params, F)

    outs = [run(jax.random.PRNGKey(s), honest(s)) for s in (1, 2)]
    for out in outs:
        assert out.shape == (F, D) and out.dtype == jnp.float32
        if case.finite:
            assert bool(jnp.all(jnp.isfinite(out))), name
    empty = atk.apply(jax.random.PRNGKey(0), honest(), params, 0)
    assert empty.shape == (0, D)


@pytest.mark.parametrize("name,i", PARAMS)
def test_vmap_over_params_agrees_with_single_calls(name, i):
    case = CASES[name][i]
    atk = attacks.build(name, **case.kwargs)
    x, key = honest(3), jax.random.PRNGKey(3)
    if case.sweep is None:  # nothing to sweep: a vmap over seeds instead
        keys = jax.random.split(key, 3)
        params = default_params(name, atk, case)
        one = jax.jit(lambda k: atk.apply(k, x, params, F))
        out = jax.jit(jax.vmap(one))(keys)
        singles = [one(k) for k in keys]
    else:
        batch = {k: jnp.asarray(v) for k, v in case.sweep.items()}
        one = jax.jit(lambda p: atk.apply(key, x, p, F))
        out = jax.jit(jax.vmap(one))(batch)
        size = len(jax.tree.leaves(batch)[0])
        singles = [one({k: v[j] for k, v in batch.items()}) for j in range(size)]
    assert out.shape == (len(singles), F, D)
    for j, single in enumerate(singles):
        np.testing.assert_allclose(out[j], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,i", PARAMS)
def test_pytree_input_through_byzjax_attack(name, i):
    case = CASES[name][i]
    if case.sweep is not None and "own" in case.sweep:
        pytest.skip("the own-gradient variant takes its input through params")
    x = honest(4)
    tree = {"w": x[:, :4].reshape(H, 2, 2), "b": x[:, 4:]}
    key = jax.random.PRNGKey(5)
    out = byzjax.attack(name, key, tree, f=F, **case.kwargs)
    assert out["w"].shape == (F, 2, 2) and out["b"].shape == (F, 2)
    # leaves are raveled in key order, "b" before "w"
    flat = attacks.one_shot(name, f=F, **case.kwargs)(
        key, jnp.concatenate([x[:, 4:], x[:, :4]], axis=1)
    )
    np.testing.assert_allclose(out["b"], flat[:, :2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        out["w"].reshape(F, 4), flat[:, 2:], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name,i", PARAMS)
def test_bfloat16_in_bfloat16_out(name, i):
    # bfloat16 rows give the attack's float32 rows on the widened input, rounded
    # to bfloat16 (an attack that reads them as stored sums them in another
    # order: one bfloat16 unit at most).
    case = CASES[name][i]
    atk = attacks.build(name, **case.kwargs)
    params = default_params(name, atk, case)
    x = honest(6, d=300).astype(jnp.bfloat16)
    if "own" in params:  # the f gradients the Byzantine workers computed
        params = {"own": honest(7, h=F, d=300).astype(jnp.bfloat16)}
    key = jax.random.PRNGKey(0)
    out = jax.jit(lambda x, p: atk.apply(key, x, p, F))(x, params)
    wide = jax.jit(lambda x, p: atk.apply(key, x, p, F))(x.astype(jnp.float32), params)
    assert out.dtype == jnp.bfloat16 and out.shape == (F, 300)
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(wide.astype(jnp.bfloat16), np.float32),
        rtol=2**-7,
        atol=1e-30,
    )


# The attacks that read bfloat16 rows as they are (`make_attack(stored=True)`).
STORED = {"alie", "ipm", "large_opposite", "sign_flip"}


@pytest.mark.parametrize("name", sorted(STORED))
def test_stored_attacks_read_bfloat16_without_a_float32_copy(name, kernels_or_xla):
    h, d = 20, 200_000
    atk = attacks.build(name)
    x = jax.ShapeDtypeStruct((h, d), jnp.bfloat16)
    fn = jax.jit(lambda x: atk.apply(jax.random.PRNGKey(0), x, atk.default_params, F))
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes
    # A float32 copy of the rows would be h * d * 4 bytes; the moments and a
    # few (d,) vectors are left.
    assert temp < 4 * d * 4, f"{temp / 1e6:.1f} MB of temporaries"


def test_unknown_names_and_parameters_raise():
    with pytest.raises(ValueError, match="valid names"):
        attacks.build("no_such_attack")
    with pytest.raises(ValueError, match="valid names"):
        byzjax.attack("no_such_attack", jax.random.PRNGKey(0), honest(), f=1)
    for name in attacks.names():
        with pytest.raises(ValueError, match="unknown parameter"):
            attacks.build(name, no_such_param=1.0)
    with pytest.raises(ValueError, match="variant"):
        attacks.build("fang", variant="median")
    with pytest.raises(ValueError, match="perturbation"):
        attacks.build("min_max", perturbation="unit")


def test_bad_counts_and_shapes_raise():
    atk = attacks.build("ipm")
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="f must be a Python int"):
        atk.apply(key, honest(), atk.default_params, 1.5)
    with pytest.raises(ValueError, match="f >= 0"):
        atk.apply(key, honest(), atk.default_params, -1)
    with pytest.raises(ValueError, match=r"shape \(h, d\)"):
        atk.apply(key, jnp.ones(5), atk.default_params, 1)
    alie = attacks.build("alie", ddof=1)
    with pytest.raises(ValueError, match="h >= 2"):
        alie.apply(key, honest(h=1), alie.default_params, 1)
    fang = attacks.build("fang", variant="krum")
    with pytest.raises(ValueError, match="n >= 2f \\+ 2"):
        fang.apply(key, honest(h=3), fang.default_params, 3)
