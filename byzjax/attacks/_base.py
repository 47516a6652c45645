"""The shape every gradient attack takes.

An attack is a pure function from (PRNG key, honest gradients, parameters) to the f
Byzantine gradients. Static configuration (formula variants, search grid sizes, the
target rule) is fixed by the builder; what people sweep (eps, z, sigma) travels in
`params`, so `jax.vmap` over params turns a sweep into one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any


class Attack(NamedTuple):
    """A gradient attack.

    Attributes:
      default_params: the sweepable parameters the builder was given (a pytree).
      apply: `apply(key, honest[h, d], params, f) -> byzantine[f, d]`; `f` is a static
        Python int, h = n - f the number of honest workers.
    """

    default_params: Params
    apply: Callable[[jax.Array, jax.Array, Params, int], jax.Array]
