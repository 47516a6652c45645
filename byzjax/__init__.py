"""byzjax: Byzantine-robust distributed SGD, simulated on accelerators with JAX.

The one-shot entry points are `aggregate` and `attack`; the registries live in
`byzjax.aggregators` and `byzjax.attacks`; data sets, models and the simulator
in `byzjax.data`, `byzjax.models` and `byzjax.sim`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import chex
    import jax

    from byzjax import aggregators, attacks, data, models, sim

__version__ = "0.1.0"

# The subpackages load on first use: `import byzjax` alone does not import jax
# (about 5 s on the 2-core AMD VM), so `python -m byzjax` restarts with the
# tuned malloc (`byzjax._allocator`) before paying for it, instead of paying twice.
_SUBPACKAGES = ("aggregators", "attacks", "data", "models", "sim")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"byzjax.{name}")
    raise AttributeError(f"module 'byzjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})


__all__ = [
    "__version__",
    "aggregate",
    "aggregators",
    "attack",
    "attacks",
    "data",
    "models",
    "sim",
]


def aggregate(
    rule: str, grads: chex.ArrayTree, *, f: int, pre=(), **params
) -> chex.ArrayTree:
    """Aggregates the n workers' vectors with a robust rule, in one jitted call.

    Args:
      rule: a registry name from `byzjax.aggregators.names()`.
      grads: an (n, d) array, or a pytree whose leaves share a leading worker axis n.
      f: the number of Byzantine workers the rule is configured to tolerate.
      pre: pre-aggregators applied first: names from
        `byzjax.aggregators.pre_names()` or `(name, params)` pairs.
      **params: the rule's hyperparameters.

    Returns:
      The aggregate: a (d,) array, or the pytree's structure without the worker axis.

    Raises:
      ValueError: unknown names or parameters, or a violated precondition (raised
        before anything is compiled).
    """
    from byzjax import aggregators
    from byzjax._pytree import ravel_workers

    run = aggregators.one_shot(rule, f=f, pre=pre, **params)
    x, unravel = ravel_workers(grads)
    return unravel(run(x))


def attack(
    name: str, key: jax.Array, honest: chex.ArrayTree, *, f: int, **params
) -> chex.ArrayTree:
    """Byzantine vectors from attack `name` against the honest workers' vectors.

    Args:
      name: a registry name from `byzjax.attacks.names()`.
      key: a PRNG key (used by randomised attacks).
      honest: an (h, d) array, or a pytree whose leaves share a leading axis h.
      f: the number of Byzantine vectors to produce.
      **params: the attack's parameters (builder arguments).

    Returns:
      An (f, d) array, or the pytree's structure with a leading axis f.
    """
    from byzjax import attacks
    from byzjax._pytree import ravel_workers

    run = attacks.one_shot(name, f=f, **params)
    x, unravel = ravel_workers(honest)
    return unravel(run(key, x))
