"""Fully connected models: multinomial logistic regression and the one-hidden-layer MLP.

The MLP 784-100-10 is the MNIST model of the Byzantine-robust SGD literature.

References:
  G. Baruch, M. Baruch, Y. Goldberg. A little is enough: circumventing defenses for
  distributed learning (ALIE). NeurIPS 2019, arXiv:1902.06156.
  C. Xie, O. Koyejo, I. Gupta. Fall of empires: breaking Byzantine-tolerant SGD by
  inner product manipulation. UAI 2019, arXiv:1903.03936.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class LogReg(nn.Module):
    """Flatten, then one dense layer to the logits (softmax regression).

    Attributes:
      num_classes: the number of output logits.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Flatten -> Dense(hidden) -> ReLU -> Dense(num_classes).

    For 28x28 inputs, 10 classes and hidden=100 this is the 784-100-10 network
    with 784*100 + 100 + 100*10 + 10 = 79,510 parameters.

    Attributes:
      num_classes: the number of output logits.
      hidden: the width of the hidden layer.
    """

    num_classes: int
    hidden: int = 100

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def logreg(num_classes: int = 10) -> LogReg:
    """Builds `LogReg`."""
    return LogReg(num_classes)


def mlp(num_classes: int = 10, hidden: int = 100) -> MLP:
    """Builds `MLP` (784-100-10 on MNIST)."""
    return MLP(num_classes, hidden)


MODELS = {"logreg": logreg, "mlp": mlp}
