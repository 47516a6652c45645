"""Pure loss and metric functions of (logits, labels), and a loss of a module."""

from __future__ import annotations

from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, -1/B sum_b log softmax(logits_b)[labels_b].

    Args:
      logits: (B, num_classes) scores.
      labels: (B,) integer class labels.

    Returns:
      A scalar.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of rows whose argmax equals the label, a float32 scalar."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def loss_fn(
    module: nn.Module,
) -> Callable[[chex.ArrayTree, jax.Array, jax.Array], jax.Array]:
    """`loss(params, x, y)`: the mean cross-entropy of `module` on one batch.

    The result is pure (no state, no RNG), so `jax.grad(loss)` can be vmapped over
    a leading worker axis of (params, x, y).

    Args:
      module: a Flax linen module built by `byzjax.models.build`.

    Returns:
      The loss function of (params, x, y); params is the `"params"` collection
      (not the `{"params": ...}` dict that `module.init` returns).
    """

    def loss(params: chex.ArrayTree, x: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy(module.apply({"params": params}, x), y)

    return loss
