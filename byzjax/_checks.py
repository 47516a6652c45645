"""Precondition checks shared by every rule, pre-aggregator and attack.

Counts (n, f, m, k, ...) are static Python ints, so every check runs when a rule is
built or traced, before XLA compiles anything, and fails with one line that names the
rule, n, f and the violated inequality.
"""

from __future__ import annotations


def require(ok: bool, rule: str, inequality: str, **counts: int) -> None:
    """Raises ValueError naming `rule`, the counts and `inequality` unless `ok`.

    Args:
      ok: whether the precondition holds.
      rule: registry name of the rule (or attack) being checked.
      inequality: the precondition as written in the paper, e.g. "n >= 2f + 3".
      **counts: the static counts involved (n=..., f=...), printed in the message.

    Raises:
      ValueError: when `ok` is false.
    """
    if not ok:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise ValueError(f"{rule}: requires {inequality}, got {shown}")


def static_int(value, rule: str, name: str, minimum: int = 0) -> int:
    """Returns `value` as a Python int >= `minimum`, or raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != value:
            raise ValueError(f"{rule}: {name} must be a Python int, got {value!r}")
        value = as_int
    if value < minimum:
        raise ValueError(f"{rule}: requires {name} >= {minimum}, got {name}={value}")
    return value
