"""Registries: plain dicts from snake_case name to builder, one per family.

Each family module exports a dict; the subpackage merges them with `merge`, which
refuses duplicates, so adding a rule is one function plus one dict entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping


def merge(kind: str, *families: Mapping[str, Callable]) -> dict[str, Callable]:
    """Merges family dicts into one registry; a name registered twice is an error."""
    merged: dict[str, Callable] = {}
    for family in families:
        for name, builder in family.items():
            register(kind, merged, name, builder)
    return merged


def register(kind: str, registry: dict, name: str, builder: Callable) -> Callable:
    """Adds `builder` under `name`; raises ValueError if the name is taken."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} is already registered")
    registry[name] = builder
    return builder


def lookup(kind: str, registry: Mapping[str, Callable], name: str) -> Callable:
    """Returns the builder registered under `name`, or raises ValueError listing all."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}") from None


def call_builder(kind: str, name: str, builder: Callable, params: dict):
    """Calls `builder(**params)`, naming unknown parameters in a ValueError."""
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [] if takes_any else sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(k for k in accepted if k != "f") or "none"
        raise ValueError(
            f"{kind} {name!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"accepted: {valid}"
        )
    return builder(**params)
