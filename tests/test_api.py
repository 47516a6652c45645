"""The curated public API: names import, registries refuse bad names, pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import byzjax


def test_public_names_import():
    for name in byzjax.__all__:
        assert hasattr(byzjax, name), name
    for module in (byzjax.aggregators, byzjax.attacks):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)


def test_version_matches_pyproject():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert byzjax.__version__ == meta["project"]["version"]


def test_unknown_rule_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*mean"):
        byzjax.aggregators.get("no_such_rule")
    with pytest.raises(ValueError, match="unknown aggregator"):
        byzjax.aggregate("no_such_rule", jnp.ones((3, 2)), f=0)


def test_unknown_attack_lists_valid_names():
    with pytest.raises(ValueError, match="unknown attack 'no_such_attack'"):
        byzjax.attacks.get("no_such_attack")


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        byzjax.aggregators.register("mean", byzjax.aggregators.get("mean"))


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="unknown parameter.*bogus"):
        byzjax.aggregate("mean", jnp.ones((3, 2)), f=0, bogus=1)


def test_pytree_round_trip_matches_flat():
    rng = np.random.default_rng(0)
    n = 5
    tree = {
        "w": rng.normal(size=(n, 3, 4)).astype(np.float32),
        "b": rng.normal(size=(n, 4)).astype(np.float32),
        "s": rng.normal(size=(n,)).astype(np.float32),
    }
    flat, unravel = byzjax._pytree.ravel_workers(tree)
    assert flat.shape == (n, 12 + 4 + 1)
    back = unravel(flat)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
    out = byzjax.aggregate("mean", tree, f=0)
    expect = jax.tree_util.tree_map(lambda a: a.astype(np.float64).mean(0), tree)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out, expect
    )


def test_pytree_leaves_must_share_worker_axis():
    with pytest.raises(ValueError, match="worker axis"):
        byzjax.aggregate("mean", {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, f=0)
