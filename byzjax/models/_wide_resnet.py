"""Wide residual networks (WRN-depth-k), with GroupNorm in place of BatchNorm.

Zagoruyko and Komodakis' pre-activation network: a 3x3 stem convolution of 16
channels, three groups of (depth - 4) / 6 basic blocks of widths 16k, 32k and 64k
(strides 1, 2, 2), then norm, ReLU, global average pooling and a dense layer. Each
block is norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv3x3 plus a shortcut (a 1x1
convolution of the pre-activated input where the shape changes). ALIE trains a WRN
on CIFAR-100.

BatchNorm is replaced by GroupNorm: BatchNorm's running statistics are mutable
state, and its batch statistics couple the examples of a minibatch, so a worker's
gradient would not be a pure function of (params, batch) the simulator can vmap.
GroupNorm has the same learned per-channel scale and bias (so the same parameter
count as the BatchNorm original) and behaves identically in training and
evaluation. Dropout is left out for the same reason (no RNG inside `apply`).

References:
  S. Zagoruyko, N. Komodakis. Wide residual networks. BMVC 2016, arXiv:1605.07146.
  Y. Wu, K. He. Group normalization. ECCV 2018, arXiv:1803.08494.
  G. Baruch, M. Baruch, Y. Goldberg. A little is enough: circumventing defenses for
  distributed learning. NeurIPS 2019, arXiv:1902.06156.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from byzjax.models._cnn import as_images

_NORMS = ("group", "layer")


class _Norm(nn.Module):
    """GroupNorm with gcd(groups, channels) groups; groups=1 is LayerNorm over HWC."""

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.GroupNorm(num_groups=math.gcd(self.groups, x.shape[-1]))(x)


class _Block(nn.Module):
    width: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pre = nn.relu(_Norm(self.groups)(x))
        if x.shape[-1] != self.width or self.stride != 1:
            shortcut = nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False)(
                pre
            )
        else:
            shortcut = x
        y = nn.Conv(
            self.width, (3, 3), strides=self.stride, padding="SAME", use_bias=False
        )(pre)
        y = nn.relu(_Norm(self.groups)(y))
        y = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(y)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 (or any size) images.

    Attributes:
      num_classes: the number of output logits.
      depth: total depth, 6 * blocks_per_group + 4 (16, 22, 28, 40, ...).
      widen_factor: the width multiplier k.
      norm_groups: GroupNorm groups (gcd with the channel count is used); 1 gives
        LayerNorm over (H, W, C).
    """

    num_classes: int
    depth: int = 16
    widen_factor: int = 4
    norm_groups: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = as_images(x)
        blocks = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False)(x)
        for group, stride in enumerate((1, 2, 2)):
            width = 16 * 2**group * self.widen_factor
            for b in range(blocks):
                x = _Block(width, stride if b == 0 else 1, self.norm_groups)(x)
        x = nn.relu(_Norm(self.norm_groups)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def wide_resnet(
    num_classes: int = 100,
    depth: int = 16,
    widen_factor: int = 4,
    norm: str = "group",
    norm_groups: int = 16,
) -> WideResNet:
    """Builds `WideResNet` (default WRN-16-4).

    Args:
      num_classes: the number of output logits (100 for CIFAR-100).
      depth: 6 * n + 4 for n >= 1 blocks per group.
      widen_factor: the width multiplier k >= 1.
      norm: "group" (GroupNorm, `norm_groups` groups) or "layer" (one group).
      norm_groups: the GroupNorm group count for norm="group".

    Raises:
      ValueError: a depth not of the form 6n + 4, or an unknown norm.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1, got {depth}")
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(_NORMS)}")
    return WideResNet(
        num_classes, depth, widen_factor, 1 if norm == "layer" else norm_groups
    )


MODELS = {"wide_resnet": wide_resnet}
