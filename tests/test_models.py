"""byzjax.models: registry, shapes, parameter counts, pure finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import byzjax.data as D
import byzjax.models as M


def _count(module, shape):
    """Parameter count by abstract evaluation (no compile, no compute)."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return M.param_count(jax.eval_shape(module.init, jax.random.key(0), x)["params"])


def test_public_names():
    for name in M.__all__:
        assert hasattr(M, name)
    assert M.names() == ("cnn", "logreg", "mlp", "wide_resnet")


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="valid names: cnn, logreg, mlp, wide_resnet"):
        M.build("resnet50", 10)
    with pytest.raises(ValueError, match="unknown parameter"):
        M.build("mlp", 10, width=5)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        M.build("wide_resnet", 100, depth=18)
    with pytest.raises(ValueError, match="norm"):
        M.build("wide_resnet", 100, norm="batch")


@pytest.mark.parametrize(
    "name, num_classes, shape, kw, expected",
    [
        ("mlp", 10, (28, 28, 1), {}, 784 * 100 + 100 + 100 * 10 + 10),
        ("mlp", 10, (784,), {}, 79_510),
        ("mlp", 10, (8, 8, 1), {"hidden": 32}, 64 * 32 + 32 + 32 * 10 + 10),
        ("logreg", 10, (28, 28, 1), {}, 784 * 10 + 10),
        # 4 convs (3x3, with bias) + dense on the 8x8x128 map of a 32x32 input
        (
            "cnn",
            10,
            (32, 32, 3),
            {},
            (27 * 64 + 64)
            + (576 * 64 + 64)
            + (576 * 128 + 128)
            + (1152 * 128 + 128)
            + (8 * 8 * 128 * 10 + 10),
        ),
        # WRN-16-4 on CIFAR-100, 2.77M as in Zagoruyko & Komodakis (2.7M)
        ("wide_resnet", 100, (32, 32, 3), {}, 2_772_020),
        ("wide_resnet", 10, (32, 32, 3), {"depth": 28, "widen_factor": 10}, None),
    ],
)
def test_param_counts(name, num_classes, shape, kw, expected):
    n = _count(M.build(name, num_classes, **kw), shape)
    if expected is None:  # WRN-28-10: 36.5M in the paper
        assert 36.4e6 < n < 36.6e6
    else:
        assert n == expected


def _numpy_params(module, x):
    """Random parameters of the right shapes without compiling `init`.

    Compiling a model's random initialisers is the slow part on CPU; the init path
    itself is exercised by `test_init` on the dense models.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes
    )


def test_init():
    module = M.build("logreg", 10)
    params = M.init(module, jax.random.key(0), (28, 28, 1))
    assert M.param_count(params) == _count(module, (28, 28, 1))
    logits = module.apply({"params": params}, jnp.ones((2, 28, 28, 1)))
    assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize(
    "name, num_classes, shape, kw",
    [
        ("mlp", 10, (28, 28, 1), {}),
        ("logreg", 7, (5,), {}),
        ("cnn", 10, (8, 8, 3), {"widths": (4, 4, 8, 8)}),
        ("wide_resnet", 100, (8, 8, 3), {"depth": 10, "widen_factor": 1}),
    ],
)
def test_apply_and_grad(name, num_classes, shape, kw):
    """Output shape, and a finite, nonzero gradient compiled under jit.

    The dense models are also checked vmapped over a worker axis, as the simulator
    runs them; the convolutional ones only plainly, since vmapping their gradient
    doubles an already dominant CPU compile time.
    """
    module = M.build(name, num_classes, **kw)
    loss = M.loss_fn(module)
    batch = 3
    x = jax.random.uniform(jax.random.key(1), (batch, *shape))
    y = jnp.arange(batch) % num_classes
    params = _numpy_params(module, x)
    logits = jax.eval_shape(module.apply, {"params": params}, x)
    assert logits.shape == (batch, num_classes) and logits.dtype == jnp.float32

    grad = jax.grad(loss)
    if name in ("mlp", "logreg"):
        grad = jax.vmap(grad, in_axes=(None, 0, 0))
        x, y = jnp.stack([x, x[::-1]]), jnp.stack([y, y[::-1]])
    grads = jax.jit(grad)(params, x, y)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.isfinite(leaf).all())
    assert all(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(grads))


def test_wide_resnet_layer_norm_variant():
    module = M.build("wide_resnet", 10, depth=10, widen_factor=1, norm="layer")
    group = M.build("wide_resnet", 10, depth=10, widen_factor=1)
    assert _count(module, (8, 8, 1)) == _count(group, (8, 8, 1))
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    assert set(variables) == {"params"}  # no mutable state (no batch statistics)
    assert jax.eval_shape(module.apply, variables, x).shape == (2, 10)


def test_cnn_rejects_flat_inputs():
    with pytest.raises(ValueError, match="B, H, W, C"):
        jax.eval_shape(
            M.build("cnn", 10).init,
            jax.random.key(0),
            jax.ShapeDtypeStruct((2, 64), jnp.float32),
        )


def test_losses():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = jnp.array([0, 1])
    assert float(M.accuracy(logits, labels)) == 0.5
    expected = np.mean(
        [
            -np.log(np.exp(2) / (np.exp(2) + 2)),
            -np.log(1 / (2 + np.exp(5))),
        ]
    )
    np.testing.assert_allclose(
        float(M.cross_entropy(logits, labels)), expected, rtol=1e-6
    )


def test_mlp_learns_mnist5k():
    """300 SGD steps (batch 64, lr 0.1) of the 784-100-10 MLP: > 80% test accuracy."""
    ds = D.load("mnist5k")
    module = M.build("mlp", ds.num_classes)
    loss = M.loss_fn(module)

    @jax.jit
    def train(key, x, y, x_test, y_test):
        params = module.init(key, x[:1])["params"]

        def step(params, k):
            idx = jax.random.randint(k, (64,), 0, x.shape[0])
            g = jax.grad(loss)(params, x[idx], y[idx])
            return jax.tree.map(lambda p, gp: p - 0.1 * gp, params, g), None

        params, _ = jax.lax.scan(step, params, jax.random.split(key, 300))
        return M.accuracy(module.apply({"params": params}, x_test), y_test)

    acc = train(jax.random.key(0), ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    assert float(acc) > 0.8
