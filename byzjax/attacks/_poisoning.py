"""Data-poisoning attacks: they change a Byzantine worker's minibatch, not its gradient.

A `Poisoning` is applied to each Byzantine worker's batch before its gradient is
computed by the honest pipeline; `poison_workers` does that for the whole (n, B, ...)
batch of one step with a per-worker mask, as one vmapped function.

References:
  Karimireddy, He, Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022, arXiv:2006.09365 (label flipping y -> C - 1 - y, also in
  Xie et al.'s code, arXiv:1805.10032).
  Baruch, Baruch, Goldberg. "A Little Is Enough", NeurIPS 2019, arXiv:1902.06156
  (backdoor: a pixel pattern with a target label).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from byzjax._checks import require, static_int
from byzjax._registry import call_builder, lookup, merge
from byzjax._registry import register as _register
from byzjax.attacks._simple import choice

Params = Any


class Poisoning(NamedTuple):
    """A data-poisoning attack on one worker's minibatch.

    Attributes:
      default_params: the sweepable parameters (a pytree).
      apply: ``apply(key, x[B, ...], y[B], params, num_classes) -> (x, y)`` with the
        same shapes and dtypes; `num_classes` is a static Python int.
    """

    default_params: Params
    apply: Callable[[jax.Array, jax.Array, jax.Array, Params, int], tuple]


def label_flip() -> Poisoning:
    """Label flipping: ``y -> C - 1 - y`` (9 - y for 10 classes), inputs unchanged.

    Returns:
      A Poisoning without parameters.
    """

    def apply(key, x, y, params, num_classes):
        num_classes = static_int(num_classes, "label_flip", "num_classes", minimum=1)
        return x, (num_classes - 1 - y).astype(y.dtype)

    return Poisoning({}, apply)


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def backdoor(
    target: int = 0,
    size: int = 5,
    corner: str = "top_left",
    value: float | None = None,
    fraction: float = 1.0,
    image_shape: Sequence[int] | None = None,
) -> Poisoning:
    """Backdoor: stamp a square pixel trigger and relabel to the target class.

    A ``size x size`` square in one corner of every poisoned image is set to
    ``value`` (all channels) and its label to ``target``; a model trained on enough
    such samples maps the trigger to the target class while the clean accuracy is
    barely affected (the ALIE paper's backdoor experiment, where the Byzantine
    workers' gradients on triggered samples are then kept within ALIE's bounds).

    Batches are ``(B, H, W)``, ``(B, H, W, C)`` (channels last) or flattened
    ``(B, D)`` with `image_shape` = (H, W) or (H, W, C) giving the layout.

    Args:
      target: the backdoor's target label (sweepable).
      size: side of the square trigger in pixels (static).
      corner: ``"top_left"``, ``"top_right"``, ``"bottom_left"``, ``"bottom_right"``.
      value: the trigger's pixel value (sweepable); None uses the batch's maximum,
        i.e. the brightest value under whatever normalisation the data has.
      fraction: probability that each sample of the batch is poisoned (sweepable);
        1.0 poisons the whole batch.
      image_shape: the image layout of flattened batches.

    Returns:
      A Poisoning with params ``{"target", "value", "fraction"}``.

    Raises:
      ValueError: size < 1, an unknown corner, or a batch whose layout does not
        fit the trigger.
    """
    size = static_int(size, "backdoor", "size", minimum=1)
    corner = choice(corner, CORNERS, "backdoor", "corner")
    static_int(target, "backdoor", "target")
    shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def apply(key, x, y, params, num_classes):
        batch = x.shape[0]
        img = x.reshape((batch,) + shape) if shape is not None else x
        require(img.ndim in (3, 4), "backdoor", "images (B, H, W[, C])", ndim=img.ndim)
        height, width = img.shape[1], img.shape[2]
        require(size <= min(height, width), "backdoor", "size <= H, W", size=size)
        rows = (
            slice(0, size) if corner.startswith("top") else slice(height - size, None)
        )
        cols = slice(0, size) if corner.endswith("left") else slice(width - size, None)
        mask = jnp.zeros((height, width), bool).at[rows, cols].set(True)
        mask = mask[:, :, None] if img.ndim == 4 else mask
        value = params["value"]
        value = jnp.max(x) if value is None else jnp.asarray(value, x.dtype)
        stamped = jnp.where(mask, value, img).astype(x.dtype).reshape(x.shape)
        chosen = jax.random.uniform(key, (batch,)) < params["fraction"]
        keep = chosen.reshape((batch,) + (1,) * (x.ndim - 1))
        x_out = jnp.where(keep, stamped, x)
        y_out = jnp.where(chosen, jnp.asarray(params["target"], y.dtype), y)
        return x_out, y_out

    return Poisoning({"target": target, "value": value, "fraction": fraction}, apply)


def poison_workers(
    poisoning: Poisoning,
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    byzantine: jax.Array,
    params: Params,
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
    """Applies `poisoning` to the batches of the Byzantine workers of one step.

    Args:
      poisoning: the attack.
      key: a PRNG key, split into one key per worker.
      x: inputs of all n workers, shape (n, B, ...).
      y: labels, shape (n, B).
      byzantine: boolean (n,) mask of the workers whose batch is poisoned.
      params: the attack's params (shared by all workers).
      num_classes: number of classes C (static).

    Returns:
      ``(x, y)`` with the Byzantine workers' batches poisoned, the others unchanged.
    """
    keys = jax.random.split(key, x.shape[0])
    px, py = jax.vmap(
        lambda k, xi, yi: poisoning.apply(k, xi, yi, params, num_classes)
    )(keys, x, y)
    sel_x = byzantine.reshape((-1,) + (1,) * (x.ndim - 1))
    sel_y = byzantine.reshape((-1,) + (1,) * (y.ndim - 1))
    return jnp.where(sel_x, px, x), jnp.where(sel_y, py, y)


POISONINGS = {"label_flip": label_flip, "backdoor": backdoor}

_POISONINGS = merge("poisoning", POISONINGS)


def poisoning_names() -> tuple[str, ...]:
    """Registry names of the data-poisoning attacks, sorted."""
    return tuple(sorted(_POISONINGS))


def get_poisoning(name: str) -> Callable[..., Poisoning]:
    """The builder of poisoning `name`; ValueError listing the valid names."""
    return lookup("poisoning", _POISONINGS, name)


def build_poisoning(name: str, **params) -> Poisoning:
    """Builds poisoning `name` with its parameters; ValueError on unknown names."""
    return call_builder("poisoning", name, get_poisoning(name), params)


def register_poisoning(name: str, builder: Callable[..., Poisoning]) -> Callable:
    """Registers a user poisoning under `name` (refuses a name already taken)."""
    return _register("poisoning", _POISONINGS, name, builder)
