"""Flax linen models, by registry name, and pure loss functions.

`names()` lists the models; `build(name, num_classes, **kw)` returns a
`flax.linen.Module` whose `apply({"params": p}, x)` is a pure function of (p, x),
with no mutable collections and no RNG, so the simulator can vmap it over workers.
Image models take (B, H, W, C); the dense models flatten any (B, ...) input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import flax.linen as nn
import jax

from byzjax._registry import call_builder, lookup, merge
from byzjax.models import _cnn, _dense, _wide_resnet
from byzjax.models._cnn import CNN
from byzjax.models._dense import MLP, LogReg
from byzjax.models._losses import accuracy, cross_entropy, loss_fn
from byzjax.models._wide_resnet import WideResNet

__all__ = [
    "CNN",
    "MLP",
    "LogReg",
    "WideResNet",
    "accuracy",
    "build",
    "cross_entropy",
    "get",
    "init",
    "loss_fn",
    "names",
    "param_count",
]

_MODELS = merge("model", _dense.MODELS, _cnn.MODELS, _wide_resnet.MODELS)


def names() -> tuple[str, ...]:
    """Registry names of the models, sorted."""
    return tuple(sorted(_MODELS))


def get(name: str) -> Callable[..., nn.Module]:
    """The builder registered under `name`; raises ValueError listing valid names."""
    return lookup("model", _MODELS, name)


def build(name: str, num_classes: int, **kw) -> nn.Module:
    """Builds model `name` with `num_classes` outputs and its own options `kw`.

    Raises:
      ValueError: an unknown name or option.
    """
    return call_builder("model", name, get(name), dict(num_classes=num_classes, **kw))


def init(module: nn.Module, key: jax.Array, feature_shape) -> chex.ArrayTree:
    """The module's `"params"` collection, initialised for examples of feature_shape."""
    x = jax.numpy.zeros((1, *tuple(feature_shape)), jax.numpy.float32)
    # jitted: one compile is far cheaper than running the initialisers op by op
    return jax.jit(module.init)(key, x)["params"]


def param_count(params: chex.ArrayTree) -> int:
    """The total number of scalars in a parameter pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
