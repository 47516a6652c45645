"""Workers: on-device minibatch sampling and vmapped per-worker gradients.

The training set and the partition's index table live on the device. Each step
draws every worker's minibatch indices with `jax.random` inside the compiled
program (with replacement, uniformly over the worker's own shard), so no step ever
returns to the host. The model's parameters travel as one flat (d,) vector: the
gradient of a worker is then directly a row of the canonical (n, d) array the rules
take, with no per-step ravel of a pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["WorkerData", "device_data", "flat_model", "sample_batches", "worker_grads"]


class WorkerData(NamedTuple):
    """The training data and its partition, as device arrays.

    Attributes:
      x: (N, ...) training features.
      y: (N,) int32 labels.
      table: (n, m) int32 indices into x: row i is worker i's shard (padded).
      sizes: (n,) int32 number of distinct examples in each row (sample
        ``table[i, :sizes[i]]`` for an exactly uniform draw over the shard).
    """

    x: jax.Array
    y: jax.Array
    table: jax.Array
    sizes: jax.Array


def device_data(x, y, table, sizes) -> WorkerData:
    """Puts the training set and the partition table on the default device."""
    return WorkerData(
        jnp.asarray(x),
        jnp.asarray(y, jnp.int32),
        jnp.asarray(table, jnp.int32),
        jnp.asarray(np.asarray(sizes), jnp.int32),
    )


def sample_batches(
    key: jax.Array, data: WorkerData, workers: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Draws one minibatch per worker in `workers`, on device.

    Args:
      key: PRNG key of this step.
      data: the device data.
      workers: (k,) int32 worker ids.
      batch_size: examples per worker (static).

    Returns:
      ``(x[k, B, ...], y[k, B])``.
    """
    k = workers.shape[0]
    cols = jax.random.randint(
        key, (k, batch_size), 0, data.sizes[workers][:, None], dtype=jnp.int32
    )
    idx = data.table[workers[:, None], cols]
    return data.x[idx], data.y[idx]


def flat_model(
    loss: Callable, params
) -> tuple[jax.Array, Callable, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]:
    """Flattens a model's parameters; returns ``(theta0, unravel, flat_loss)``.

    Args:
      loss: ``loss(params, x, y) -> scalar`` on one batch.
      params: the initial parameter pytree.

    Returns:
      The (d,) float32 vector, the map back to the pytree, and
      ``flat_loss(theta, x, y) = loss(unravel(theta), x, y)``.
    """
    theta, unravel = ravel_pytree(params)

    def flat_loss(theta, x, y):
        return loss(unravel(theta), x, y)

    return theta, unravel, flat_loss


def worker_grads(
    flat_loss: Callable, theta: jax.Array, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Losses and gradients of k workers at the shared parameters, one vmap.

    Args:
      flat_loss: ``flat_loss(theta, x, y)`` from `flat_model`.
      theta: (d,) parameters (shared by all workers).
      x: (k, B, ...) the workers' batches.
      y: (k, B) labels.

    Returns:
      ``(losses[k], grads[k, d])``.
    """
    return jax.vmap(jax.value_and_grad(flat_loss), in_axes=(None, 0, 0))(theta, x, y)
