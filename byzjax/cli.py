"""The `byzjax` command line: `run`, `list` and `demo` (the default experiment).

    byzjax run [config.toml] [key=value ...]
    byzjax list
    byzjax demo [key=value ...]

Values are TOML literals (3, 0.1, true, [nnm, bucketing]); unquoted words are
strings. A bad configuration stops before anything is compiled, with one line that
names the field and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from byzjax._allocator import reexec_tuned

__all__ = ["DEMO_ATTACKS", "DEMO_RULES", "demo", "main"]

DEMO_RULES = ("mean", "median", "trimmed_mean", "krum")
DEMO_ATTACKS = (("none", {}), ("alie", {}), ("ipm", {"eps": 0.1}))
# The default experiment's base setting (any field can be overridden on the line).
DEMO_DEFAULTS = {
    "dataset": "mnist5k",
    "model": "mlp",
    "workers": 25,
    "byzantine": 5,
    "steps": 300,
    "eval_every": 25,
    "log_every": 10,
    "lr": 0.1,
    "influence": False,
    "out": "runs/demo",
}


def _fields_help() -> str:
    from byzjax.sim.config import FIELDS, Config

    defaults = Config()
    lines = ["fields (key=value; default in brackets):"]
    for name, field in FIELDS.items():
        default = getattr(defaults, name)
        doc = field.metadata["doc"]
        choices = field.metadata.get("choices")
        if choices:
            doc += f" {{{'|'.join(choices)}}}"
        text = f"  {name} [{default!r}]: {doc}"
        lines += textwrap.wrap(text, 88, subsequent_indent="      ")
    lines += [
        "",
        "parameters of the rule, pre-aggregators and attack:",
        "  aggregator.<param>=v   e.g. aggregator=multi_krum aggregator.m=10",
        "  pre.<name>.<param>=v   e.g. pre=[bucketing] pre.bucketing.s=2",
        "  attack.<param>=v       e.g. attack=ipm attack.eps=0.1",
        "",
        "example:",
        "  byzjax run dataset=mnist5k model=mlp workers=25 byzantine=11 "
        "aggregator=krum \\",
        "      attack=ipm attack.eps=0.1 steps=300 seed=1 out=runs/foe",
        "",
        "writes out/metrics.jsonl, summary.json, config.toml and curves.png.",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="byzjax",
        description="Byzantine-robust distributed SGD, simulated with JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train one setting and write its records",
        description="Train one setting: a TOML config file and/or key=value overrides.",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "items",
        nargs="*",
        metavar="[config.toml] key=value",
        help="an optional TOML config file, then overrides",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("list", help="registered rules, attacks, data sets and models")
    demo_p = sub.add_parser(
        "demo",
        help="the default experiment (MNIST-5k, MLP, 25 workers, 4 rules x 3 attacks)",
        description="Test accuracy of "
        + ", ".join(DEMO_RULES)
        + " under no attack, ALIE and IPM(eps=0.1) on MNIST-5k with the MLP, "
        "n=25, f=5. Each rule's three runs are one vmapped program.",
    )
    demo_p.add_argument("items", nargs="*", metavar="key=value")
    demo_p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _fail(command: str, message: str) -> int:
    print(f"byzjax {command}: error: {message}", file=sys.stderr)
    return 2


def _resolve(items: Sequence[str]):
    """A Config from an optional leading TOML file and key=value overrides."""
    from byzjax.sim import config as config_lib

    items = list(items)
    cfg = config_lib.Config()
    if items and "=" not in items[0]:
        cfg = config_lib.load(items.pop(0))
    return config_lib.apply_overrides(cfg, items)


def _cmd_run(args) -> int:
    from byzjax.sim import ConfigError, run, validate

    try:
        cfg = _resolve(args.items)
        setup = validate(cfg)
    except ConfigError as err:
        return _fail("run", str(err))
    result = run(cfg, progress=not args.quiet, setup=setup)
    s = result.summary
    print(
        f"{s['label']}: test accuracy {s['test_accuracy']:.4f}, "
        f"loss {s['loss']:.4f}, {s['steps_per_s']:.1f} steps/s, "
        f"compile {s['compile_s']:.1f} s -> {result.out}"
    )
    return 0


def _cmd_list() -> int:
    from byzjax import aggregators, attacks, data, models

    rows = [
        ("rules", aggregators.names()),
        ("pre-aggregators", aggregators.pre_names()),
        ("attacks", ("none", *attacks.names())),
        ("data poisoning", attacks.poisoning_names()),
        ("data sets", data.names()),
        ("models", models.names()),
    ]
    for title, names in rows:
        print(f"{title + ':':17}" + ", ".join(names))
    return 0


def demo(items: Sequence[str] = (), *, progress: bool = True) -> dict:
    """The default experiment: 4 rules x (none, ALIE, IPM) on MNIST-5k, one seed.

    Each rule's three attack settings run as one vmapped program (one compilation
    per rule). Writes ``out/results.json``, ``out/table.md``, ``out/curves.png`` (a
    panel per attack, a line per rule) and each run's ``metrics.jsonl`` under
    ``out/<rule>-<attack>/``.

    Args:
      items: `key=value` overrides of the base setting (`DEMO_DEFAULTS`).
      progress: show progress bars.

    Returns:
      ``{"accuracy": {rule: {attack: acc}}, "out": path, "wall_s": ...}``.

    Raises:
      ConfigError: a bad override.
    """
    from byzjax import plotting, records
    from byzjax.sim import config as config_lib
    from byzjax.sim import run_batch, validate

    base = config_lib.from_mapping(DEMO_DEFAULTS)
    base = config_lib.apply_overrides(base, items)
    out = Path(base.out)
    for rule in DEMO_RULES:  # fail fast on every rule before compiling anything
        validate(
            dataclasses.replace(base, aggregator=rule), attacks_=list(DEMO_ATTACKS)
        )
    t0 = time.perf_counter()
    acc: dict[str, dict[str, float]] = {}
    panels: dict[str, dict[str, list]] = {a: {} for a, _ in DEMO_ATTACKS}
    timings = {}
    for rule in DEMO_RULES:
        cfg = dataclasses.replace(base, aggregator=rule)
        results = run_batch(
            cfg, attacks_=list(DEMO_ATTACKS), seeds=[cfg.seed], progress=progress
        )
        acc[rule] = {}
        for (attack, _), runs in zip(DEMO_ATTACKS, results, strict=True):
            res = runs[0]
            acc[rule][attack] = round(res.summary["test_accuracy"], 4)
            panels[attack][rule] = res.records
            writer = records.RunWriter(out / f"{rule}-{attack}")
            writer.write_config(config_lib.to_toml(res.config))
            writer.append(res.records)
            writer.write_summary(res.summary)
        s = results[0][0].summary
        timings[rule] = {
            "compile_s": s["compile_s"],
            "train_s": s["train_s"],
            "steps_per_s": s["steps_per_s"],
        }
    wall = time.perf_counter() - t0
    title = (
        f"{base.dataset}, {base.model}, n={base.workers}, f={base.byzantine}, "
        f"batch {base.batch_size}/worker, {base.optimizer} lr={base.lr}, "
        f"{base.steps} steps, seed {base.seed}"
    )
    attacks_shown = [
        a if not p else f"{a}({', '.join(f'{k}={v}' for k, v in p.items())})"
        for a, p in DEMO_ATTACKS
    ]
    header = "| rule | " + " | ".join(attacks_shown) + " |"
    lines = [header, "|" + "---|" * (len(DEMO_ATTACKS) + 1)]
    for rule in DEMO_RULES:
        cells = " | ".join(f"{acc[rule][a]:.3f}" for a, _ in DEMO_ATTACKS)
        lines.append(f"| {rule} | {cells} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"Test accuracy: {title}\n\n{table}\n")
    plot = plotting.plot_grid(
        {
            name: panels[a]
            for name, (a, _) in zip(attacks_shown, DEMO_ATTACKS, strict=True)
        },
        out / "curves.png",
        title,
    )
    results_json = {
        "title": title,
        "accuracy": acc,
        "wall_s": wall,
        "per_rule": timings,
        "config": base.to_dict(),
    }
    (out / "results.json").write_text(
        json.dumps(records.clean(results_json), indent=2) + "\n"
    )
    return {
        "accuracy": acc,
        "table": table,
        "title": title,
        "plot": plot,
        "wall_s": wall,
    }


def _cmd_demo(args) -> int:
    from byzjax.sim import ConfigError

    try:
        result = demo(args.items, progress=not args.quiet)
    except ConfigError as err:
        return _fail("demo", str(err))
    print(f"\nTest accuracy: {result['title']}\n")
    print(result["table"])
    print(f"\n{result['wall_s']:.0f} s; plot: {result['plot']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `byzjax` command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "list":
        return _cmd_list()
    return _cmd_demo(args)


def entry() -> None:
    """`main` in a process restarted with the malloc settings of
    `byzjax._allocator` (large XLA:CPU buffers are otherwise faulted in afresh on
    every call): `python -m byzjax.cli`, and the `byzjax` command and `python -m
    byzjax` after their earlier restart (`byzjax.__main__`)."""
    reexec_tuned()
    sys.exit(main())


if __name__ == "__main__":
    entry()
