"""The small CIFAR-10 convolutional network of Fall of Empires.

Xie et al. train "a CNN with 4 convolutional layers and 1 fully connected layer"
on CIFAR-10 without listing the layers in the paper. Our reading, the common
VGG-style layout for that description: conv3x3(64) -> conv3x3(64) -> maxpool 2 ->
conv3x3(128) -> conv3x3(128) -> maxpool 2 -> dense(num_classes), ReLU after each
convolution, 'SAME' padding. Their implementation also had BatchNorm and dropout;
both are left out here so that `apply` stays a pure, deterministic function of
(params, x), which the simulator vmaps over workers.

References:
  C. Xie, O. Koyejo, I. Gupta. Fall of empires: breaking Byzantine-tolerant SGD by
  inner product manipulation. UAI 2019, arXiv:1903.03936.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


def as_images(x: jax.Array) -> jax.Array:
    """(B, H, W) -> (B, H, W, 1); (B, H, W, C) unchanged; other ranks rejected."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"convolutional models take (B, H, W, C) images, got shape {x.shape}"
        )
    return x


class CNN(nn.Module):
    """Four 3x3 convolutions in two pooled stages, then one dense layer.

    Attributes:
      num_classes: the number of output logits.
      widths: the channels of the four convolutions.
    """

    num_classes: int
    widths: Sequence[int] = (64, 64, 128, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = as_images(x)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            if i % 2 == 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


def cnn(num_classes: int = 10, widths: Sequence[int] = (64, 64, 128, 128)) -> CNN:
    """Builds `CNN` (Fall of Empires' CIFAR-10 network, our reading)."""
    if len(widths) != 4:
        raise ValueError(f"cnn has four convolutions; got widths={tuple(widths)}")
    return CNN(num_classes, tuple(widths))


MODELS = {"cnn": cnn}
