"""The run configuration: one flat record of fields, each with a default and a doc.

A `Config` is what `byzjax run` resolves from a TOML file and `key=value` overrides,
what the simulator is built from, and what is written back to `out/config.toml`.
Names of rules, attacks, data sets and models are plain strings here; they are
checked (and the rule's precondition traced) by `byzjax.sim.validate` before anything
is compiled, and every error names the field it came from.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIELDS",
    "Config",
    "ConfigError",
    "apply_overrides",
    "from_mapping",
    "load",
    "parse_value",
    "to_toml",
]


class ConfigError(ValueError):
    """A bad configuration value; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _f(default, doc: str, choices: Sequence[str] | None = None):
    meta = {"doc": doc, "choices": tuple(choices) if choices else None}
    if isinstance(default, dict | list | tuple):
        factory = (
            (lambda d=default: type(d)(d))
            if not isinstance(default, dict)
            else (lambda d=default: dict(d))
        )
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Config:
    """Everything one simulated run depends on (see `byzjax run --help`)."""

    dataset: str = _f("mnist5k", "data set name (`byzjax list`)")
    model: str = _f("mlp", "model name (`byzjax list`)")
    workers: int = _f(25, "number of workers n (honest and Byzantine)")
    byzantine: int = _f(5, "number of Byzantine workers f (0 <= f < n)")
    tolerate: int | None = _f(None, "f the rule is configured for (default: byzantine)")
    placement: str = _f(
        "fixed",
        "Byzantine rows: 'fixed' (workers 0..f-1, rows first) or 'random' "
        "(redrawn every step from the PRNG; SPEC D17)",
        ("fixed", "random"),
    )
    aggregator: str = _f("mean", "aggregation rule name")
    aggregator_params: dict = _f({}, "rule hyperparameters: aggregator.<param>=v")
    pre: list = _f([], "pre-aggregators applied in order, e.g. pre=[nnm,bucketing]")
    pre_params: dict = _f({}, "pre-aggregator params: pre.<name>.<param>=v")
    attack: str = _f(
        "none",
        "gradient or data-poisoning attack name; 'none' = Byzantine "
        "workers send honest gradients",
    )
    attack_params: dict = _f({}, "attack parameters: attack.<param>=v")
    steps: int = _f(300, "number of SGD steps")
    batch_size: int = _f(50, "minibatch size per worker")
    optimizer: str = _f(
        "sgd", "server optimizer applied to the aggregate", ("sgd", "momentum", "adam")
    )
    lr: float = _f(0.1, "server learning rate")
    server_momentum: float = _f(0.9, "momentum of optimizer=momentum")
    momentum: float = _f(
        0.0,
        "worker momentum beta: workers send m = beta m + (1 - beta) g (0 = off)",
    )
    eval_every: int = _f(50, "evaluate the test set every this many steps")
    log_every: int = _f(10, "write one metrics record every this many steps")
    influence: bool | None = _f(
        None,
        "log the Byzantine rows' influence on the aggregate (one extra VJP); "
        "default: on for the selection rules krum, multi_krum, bulyan, mda",
    )
    seed: int = _f(0, "PRNG seed (model init, batches, placement, attack)")
    data_seed: int = _f(0, "seed of the train/test split and the partition")
    partition: str = _f(
        "iid", "how training data is split among workers", ("iid", "dirichlet")
    )
    alpha: float = _f(1.0, "Dirichlet concentration for partition=dirichlet")
    data_dir: str | None = _f(None, "prepared TFDS data directory (TFDS sets only)")
    out: str | None = _f(None, "output directory (default runs/<setting>)")

    def rule_f(self) -> int:
        """The f the aggregation rule is built for."""
        return self.byzantine if self.tolerate is None else self.tolerate

    def label(self) -> str:
        """A short description of the setting, for titles and default paths."""
        atk = self.attack
        if self.attack_params:
            atk += "(" + ",".join(f"{k}={v}" for k, v in self.attack_params.items())
            atk += ")"
        rule = "+".join([*self.pre, self.aggregator])
        return (
            f"{self.dataset}/{self.model} n={self.workers} f={self.byzantine} "
            f"{rule} vs {atk}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and TOML-friendly dict of all fields."""
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_PARAM_PREFIX = {"aggregator": "aggregator_params", "attack": "attack_params"}


def parse_value(text: str) -> Any:
    """Parses an override value as a TOML literal; bare words are strings.

    `3` -> 3, `0.1` -> 0.1, `true` -> True, `[nnm, bucketing]` -> a list of strings,
    `runs/foe` -> "runs/foe", `none`/`null` -> None (TOML has no null).
    """
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(p) for p in inner.split(",")] if inner else []
    return text


def _coerce(name: str, value: Any) -> Any:
    """Converts `value` to field `name`'s type, or raises ConfigError."""
    field = FIELDS[name]
    kind = field.type
    if value is None:
        if "None" in str(kind):
            return None
        raise ConfigError(name, "must not be empty")
    if "int" in str(kind) and "float" not in str(kind):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if not float(value).is_integer():
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        return float(value)
    if kind in ("bool", "bool | None"):
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if kind == "list":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) for v in value
        ):
            raise ConfigError(name, f"expected a list of names, got {value!r}")
        return list(value)
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a table of parameters, got {value!r}")
        return dict(value)
    # str or str | None: TOML reads the attack names `nan` and `inf` (and a path
    # such as out=2024) as numbers, so numbers are turned back into words
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}")
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(name, f"unknown value {value!r}; valid: {', '.join(choices)}")
    return value


def _set(values: dict, key: str, value: Any) -> None:
    """Sets dotted `key` in the raw field dict `values` (see `apply_overrides`)."""
    head, _, rest = key.partition(".")
    if head == "pre" and rest:
        name, _, param = rest.partition(".")
        if not param:
            raise ConfigError(key, "expected pre.<name>.<param>=value")
        values.setdefault("pre_params", {}).setdefault(name, {})[param] = value
        return
    if head in _PARAM_PREFIX and rest:
        if rest == "name":
            values[head] = value
        else:
            values.setdefault(_PARAM_PREFIX[head], {})[rest] = value
        return
    if head in ("aggregator_params", "attack_params") and rest:
        values.setdefault(head, {})[rest] = value
        return
    if head == "pre_params" and rest:
        name, _, param = rest.partition(".")
        values.setdefault("pre_params", {}).setdefault(name, {})[param] = value
        return
    if head not in FIELDS or rest:
        raise ConfigError(key, f"unknown field; valid fields: {', '.join(FIELDS)}")
    if head in ("aggregator", "attack") and isinstance(value, Mapping):
        # TOML table form: [aggregator] name = "krum", m = 3
        table = dict(value)
        if "name" in table:
            values[head] = table.pop("name")
        values.setdefault(_PARAM_PREFIX[head], {}).update(table)
        return
    if head in ("aggregator_params", "attack_params", "pre_params"):
        if not isinstance(value, Mapping):
            raise ConfigError(head, f"expected a table of parameters, got {value!r}")
        values.setdefault(head, {}).update(dict(value))
        return
    values[head] = value


def from_mapping(mapping: Mapping[str, Any], base: Config | None = None) -> Config:
    """A Config from a (possibly nested) mapping of field values over `base`.

    Raises:
      ConfigError: an unknown field or a value of the wrong type.
    """
    values = dataclasses.asdict(base or Config())
    for key, value in mapping.items():
        _set(values, key, value)
    coerced = {name: _coerce(name, values[name]) for name in FIELDS}
    for rule, params in coerced["pre_params"].items():
        if not isinstance(params, Mapping):
            raise ConfigError(f"pre.{rule}", "expected pre.<name>.<param>=value")
    return Config(**coerced)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Applies `key=value` strings (values parsed by `parse_value`) to `config`.

    Raises:
      ConfigError: a malformed item, an unknown field or a badly typed value.
    """
    values = dataclasses.asdict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "expected key=value")
        _set(values, key, parse_value(text))
    return Config(**{name: _coerce(name, values[name]) for name in FIELDS})


def load(path: str | Path) -> Config:
    """Reads a TOML config file (missing fields keep their defaults).

    Raises:
      ConfigError: the file is missing or invalid, or holds an unknown field.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"no such file {str(path)!r}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{path}: {err}") from None
    return from_mapping(raw)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Config) -> str:
    """The config as TOML that `load` reads back (None fields are left out)."""
    data = config.to_dict()
    lines, tables = [], []
    for name, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, table in tables:
        flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        if flat:
            lines.append(f"\n[{name}]")
            lines += [
                f"{k} = {_toml_value(v)}" for k, v in flat.items() if v is not None
            ]
        for sub, params in nested.items():
            lines.append(f"\n[{name}.{sub}]")
            lines += [
                f"{k} = {_toml_value(v)}" for k, v in params.items() if v is not None
            ]
    return "\n".join(lines) + "\n"
