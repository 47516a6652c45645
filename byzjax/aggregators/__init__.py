"""Robust aggregation rules and pre-aggregators, by registry name.

`names()` lists the rules, `get(name)` returns a builder; `build(rule, f=..., pre=...)`
returns one Aggregator with the pre-aggregators chained in front.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax

from byzjax._registry import call_builder, lookup, merge
from byzjax._registry import register as _register
from byzjax.aggregators import (
    _average,
    _bulyan,
    _clipping,
    _coordinatewise,
    _geometric,
    _krum,
    _majority,
    _mda,
    _preagg,
)
from byzjax.aggregators._base import Aggregator, PreAggregator, stateless, stateless_pre
from byzjax.aggregators._compose import chain

__all__ = [
    "Aggregator",
    "PreAggregator",
    "build",
    "chain",
    "get",
    "get_pre",
    "names",
    "pre_names",
    "register",
    "register_pre",
    "stateless",
    "stateless_pre",
]

_RULES = merge(
    "aggregator",
    _average.RULES,
    _coordinatewise.RULES,
    _krum.RULES,
    _bulyan.RULES,
    _geometric.RULES,
    _clipping.RULES,
    _mda.RULES,
    _majority.RULES,
)
_PRE = merge("pre-aggregator", _preagg.PRE)


def names() -> tuple[str, ...]:
    """Registry names of the aggregation rules, sorted."""
    return tuple(sorted(_RULES))


def pre_names() -> tuple[str, ...]:
    """Registry names of the pre-aggregators, sorted."""
    return tuple(sorted(_PRE))


def get(name: str) -> Callable[..., Aggregator]:
    """The builder of rule `name`; ValueError listing the valid names if unknown."""
    return lookup("aggregator", _RULES, name)


def get_pre(name: str) -> Callable[..., PreAggregator]:
    """The builder of pre-aggregator `name`; ValueError listing valid names."""
    return lookup("pre-aggregator", _PRE, name)


def register(name: str, builder: Callable[..., Aggregator]) -> Callable:
    """Registers a user rule under `name` (refuses a name already taken)."""
    return _register("aggregator", _RULES, name, builder)


def register_pre(name: str, builder: Callable[..., PreAggregator]) -> Callable:
    """Registers a user pre-aggregator under `name` (refuses a taken name)."""
    return _register("pre-aggregator", _PRE, name, builder)


def _pre_entry(entry) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    try:
        name, params = entry
    except (TypeError, ValueError):
        raise ValueError(
            f"a pre-aggregator is a name or a (name, params) pair, got {entry!r}"
        ) from None
    return name, dict(params)


def build(
    rule: str,
    *,
    f: int,
    pre: Sequence[str | tuple[str, dict]] = (),
    **params,
) -> Aggregator:
    """Builds rule `rule` for `f` Byzantine workers, with pre-aggregators in front.

    Args:
      rule: a registry name from `names()`.
      f: the number of Byzantine workers the rule is configured to tolerate.
      pre: pre-aggregators applied first, in order: names from `pre_names()`, or
        `(name, params)` pairs; each is built with the same `f`.
      **params: the rule's hyperparameters.

    Returns:
      An Aggregator (a chained one when `pre` is not empty).

    Raises:
      ValueError: unknown names or parameters, or a violated static precondition.
    """
    agg = call_builder("aggregator", rule, get(rule), dict(params, f=f))
    stages = [
        call_builder("pre-aggregator", name, get_pre(name), dict(p, f=f))
        for name, p in map(_pre_entry, pre)
    ]
    return chain(stages, agg)


@functools.lru_cache(maxsize=512)
def _one_shot(rule: str, f: int, pre: tuple, items: tuple):
    """A jitted one-shot aggregation, cached per (rule, f, pre, hyperparameters)."""
    agg = build(rule, f=f, pre=[(n, dict(p)) for n, p in pre], **dict(items))

    @jax.jit
    def run(x):
        return agg.update(x, agg.init(x), agg.default_params)[0]

    return run


def one_shot(rule: str, *, f: int, pre=(), **params) -> Callable:
    """Returns a jitted `x[n, d] -> aggregate[d]` for one configuration (cached)."""
    pre_key = tuple(
        (name, tuple(sorted(p.items()))) for name, p in map(_pre_entry, pre)
    )
    try:
        return _one_shot(rule, f, pre_key, tuple(sorted(params.items())))
    except TypeError:  # unhashable hyperparameters (arrays): build without the cache
        return _one_shot.__wrapped__(rule, f, pre_key, tuple(sorted(params.items())))
