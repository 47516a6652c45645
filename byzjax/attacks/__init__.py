"""Gradient attacks, by registry name (see `names()`), and data-poisoning attacks.

Gradient attacks map (key, honest[h, d], params, f) to the f Byzantine rows; the
data-poisoning attacks (`poisoning_names()`) change a Byzantine worker's minibatch
before its gradient is computed. See docs/attacks.md for the table of formulas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from byzjax._checks import static_int
from byzjax._registry import call_builder, lookup, merge
from byzjax._registry import register as _register
from byzjax.attacks import _alie, _ipm, _mimic, _optimized, _simple
from byzjax.attacks._alie import z_max
from byzjax.attacks._base import Attack
from byzjax.attacks._mimic import MimicState, StatefulAttack, mimic_heuristic
from byzjax.attacks._optimized import fang_krum_lambda_max
from byzjax.attacks._poisoning import (
    Poisoning,
    build_poisoning,
    get_poisoning,
    poison_workers,
    poisoning_names,
    register_poisoning,
)

__all__ = [
    "Attack",
    "MimicState",
    "Poisoning",
    "StatefulAttack",
    "build",
    "build_poisoning",
    "fang_krum_lambda_max",
    "get",
    "get_poisoning",
    "mimic_heuristic",
    "names",
    "one_shot",
    "poison_workers",
    "poisoning_names",
    "register",
    "register_poisoning",
    "z_max",
]

_ATTACKS = merge(
    "attack",
    _simple.ATTACKS,
    _alie.ATTACKS,
    _ipm.ATTACKS,
    _mimic.ATTACKS,
    _optimized.ATTACKS,
)


def names() -> tuple[str, ...]:
    """Registry names of the gradient attacks, sorted."""
    return tuple(sorted(_ATTACKS))


def get(name: str) -> Callable[..., Attack]:
    """The builder of attack `name`; ValueError listing the valid names if unknown."""
    return lookup("attack", _ATTACKS, name)


def register(name: str, builder: Callable[..., Attack]) -> Callable:
    """Registers a user attack under `name` (refuses a name already taken)."""
    return _register("attack", _ATTACKS, name, builder)


def build(name: str, **params) -> Attack:
    """Builds attack `name` with its parameters; ValueError on unknown names."""
    return call_builder("attack", name, get(name), params)


@functools.lru_cache(maxsize=512)
def _one_shot(name: str, f: int, items: tuple):
    atk = build(name, **dict(items))
    f = static_int(f, name, "f", minimum=1)

    @jax.jit
    def run(key, honest):
        return atk.apply(key, honest, atk.default_params, f)

    return run


def one_shot(name: str, *, f: int, **params) -> Callable:
    """Returns a jitted `(key, honest[h, d]) -> byzantine[f, d]` (cached)."""
    items = tuple(sorted(params.items()))
    try:
        return _one_shot(name, f, items)
    except TypeError:  # unhashable parameters (arrays): build without the cache
        return _one_shot.__wrapped__(name, f, items)
