"""A whole run: validation, then `lax.scan` over chunks of steps, compiled once.

Python touches only chunk boundaries: the progress bar, the test-set evaluation and
the records. A chunk is ``gcd(log_every, eval_every, steps)`` steps scanned inside
one jitted call whose state argument is donated, so the train state is updated in
place and every chunk has the same shape (one compilation per run, even when
`steps` is not a multiple of `eval_every`). The per-step metrics of a chunk come
back as one small stacked array.

`run_batch` vmaps the same chunk over a batch of runs (seeds, and gradient attacks
selected by an index in the hyperparameters), so runs that share shapes share one
compiled program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from byzjax import aggregators, attacks, data, models
from byzjax.sim import step as step_lib
from byzjax.sim.config import Config, ConfigError
from byzjax.sim.diagnostics import METRICS
from byzjax.sim.worker import WorkerData, device_data

__all__ = [
    "RunResult",
    "Setup",
    "chunk_length",
    "default_out",
    "make_chunk",
    "run",
    "run_batch",
    "validate",
]

_TFDS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


class Setup(NamedTuple):
    """A validated configuration with its data on device and its simulator."""

    config: Config
    dataset: data.Dataset
    data: WorkerData
    x_test: jax.Array
    y_test: jax.Array
    sim: step_lib.Simulator


class RunResult(NamedTuple):
    """What a finished run returns.

    Attributes:
      config: the resolved configuration.
      records: the metric records (also written to metrics.jsonl).
      summary: the summary (also written to summary.json).
      state: the final TrainState.
      out: the output directory, or None when nothing was written.
    """

    config: Config
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    state: Any
    out: Path | None


def chunk_length(config: Config) -> int:
    """Steps per compiled chunk: logs, evaluations and the end fall on boundaries."""
    return math.gcd(config.log_every, config.eval_every, config.steps)


def default_out(config: Config) -> Path:
    """runs/<rule>-<attack>-n<n>-f<f>-s<seed> when `out` is not given."""
    rule = "+".join([*config.pre, config.aggregator])
    return Path("runs") / (
        f"{rule}-{config.attack}-n{config.workers}-f{config.byzantine}-s{config.seed}"
    )


def _field_of_build_error(config: Config, err: Exception) -> str:
    """The field to blame for a ValueError raised while building or tracing a rule."""
    text = str(err)
    for name in config.pre:  # "clipping: tau (the clipping radius) is required"
        if text.startswith(f"{name}:") or f"pre-aggregator {name!r}" in text:
            return f"pre.{name}"
    for name in config.aggregator_params:  # "requires m <= n, got ..., m=40"
        if f" {name}=" in text or f"{name} " in text.partition("got")[0]:
            return f"aggregator.{name}"
    if "unknown parameter" in text or "must be one of" in text or "f=" not in text:
        return "aggregator"
    return "byzantine" if config.tolerate is None else "tolerate"


@functools.lru_cache(maxsize=8)
def _load(name: str, data_dir: str | None, seed: int) -> data.Dataset:
    return data.load(name, data_dir=data_dir, seed=seed)


def _check_counts(c: Config) -> None:
    def need(ok: bool, field: str, text: str):
        if not ok:
            raise ConfigError(field, text)

    need(c.workers >= 1, "workers", f"must be >= 1, got {c.workers}")
    need(
        0 <= c.byzantine < c.workers,
        "byzantine",
        f"must satisfy 0 <= byzantine < workers={c.workers}, got {c.byzantine}",
    )
    need(
        c.tolerate is None or 0 <= c.tolerate < c.workers,
        "tolerate",
        f"must satisfy 0 <= tolerate < workers={c.workers}, got {c.tolerate}",
    )
    for name in ("steps", "batch_size", "eval_every", "log_every"):
        value = getattr(c, name)
        need(value >= 1, name, f"must be >= 1, got {value}")
    need(c.lr > 0, "lr", f"must be > 0, got {c.lr}")
    need(0 <= c.momentum < 1, "momentum", f"must lie in [0, 1), got {c.momentum}")
    need(
        0 <= c.server_momentum < 1,
        "server_momentum",
        f"must lie in [0, 1), got {c.server_momentum}",
    )
    need(c.alpha > 0, "alpha", f"must be > 0, got {c.alpha}")


def _check_names(c: Config, attacks_) -> None:
    def known(value: str, valid: Sequence[str], field: str):
        if value not in valid:
            raise ConfigError(
                field, f"unknown name {value!r}; valid: {', '.join(sorted(valid))}"
            )

    known(c.dataset, data.names(), "dataset")
    known(c.model, models.names(), "model")
    known(c.aggregator, aggregators.names(), "aggregator")
    for p in c.pre:
        known(p, aggregators.pre_names(), "pre")
    for p in c.pre_params:
        if p not in c.pre:
            raise ConfigError(f"pre.{p}", f"{p!r} is not in pre={c.pre}")
    valid_attacks = ("none", *attacks.names(), *attacks.poisoning_names())
    for name in [c.attack] if attacks_ is None else [a for a, _ in attacks_]:
        known(name, valid_attacks, "attack")


def validate(config: Config, *, attacks_=None) -> Setup:
    """Checks `config` and builds its simulator, before anything is compiled.

    Names, counts and types are checked first; then the data are loaded and
    partitioned (the batch must fit in every worker's shard); then the rule and the
    attack are traced with `jax.eval_shape` on the real (n, d) shapes, which raises
    their precondition ValueError (e.g. Krum's n >= 2f + 3) without compiling.

    Args:
      config: the configuration.
      attacks_: optional switched attacks, see `byzjax.sim.step.build`.

    Returns:
      The Setup.

    Raises:
      ConfigError: naming the offending field.
    """
    c = config
    _check_counts(c)
    _check_names(c, attacks_)
    try:
        agg = aggregators.build(
            c.aggregator,
            f=c.rule_f(),
            pre=[(p, c.pre_params.get(p, {})) for p in c.pre],
            **c.aggregator_params,
        )
    except ValueError as err:
        raise ConfigError(_field_of_build_error(c, err), str(err)) from None
    try:
        specs = (
            [step_lib.resolve_attack(c.attack, c.attack_params)]
            if attacks_ is None
            else [step_lib.resolve_attack(a, p) for a, p in attacks_]
        )
    except ValueError as err:
        raise ConfigError("attack", str(err)) from None
    try:
        models.build(c.model, 10)
    except ValueError as err:
        raise ConfigError("model", str(err)) from None

    if c.data_dir is not None and not Path(c.data_dir).expanduser().is_dir():
        raise ConfigError("data_dir", f"no such directory {c.data_dir!r}")
    try:
        ds = _load(c.dataset, c.data_dir, c.data_seed)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        field = "data_dir" if c.dataset in _TFDS else "dataset"
        raise ConfigError(field, str(err).splitlines()[0]) from None
    try:
        table = data.partition(
            c.data_seed, ds.y_train, c.workers, scheme=c.partition, alpha=c.alpha
        )
    except ValueError as err:
        raise ConfigError("partition", str(err)) from None
    sizes = data.shard_sizes(table)
    if c.batch_size > int(sizes.min()):
        raise ConfigError(
            "batch_size",
            f"{c.batch_size} is larger than the smallest worker shard "
            f"({int(sizes.min())} examples of {ds.name} for {c.workers} workers)",
        )
    try:
        sim = step_lib.build(
            c,
            num_classes=ds.num_classes,
            feature_shape=ds.feature_shape,
            attacks_=attacks_,
        )
    except ValueError as err:
        raise ConfigError(_field_of_build_error(c, err), str(err)) from None
    try:
        step_lib.check_rule(agg, c.workers, sim.d)
    except ValueError as err:
        raise ConfigError(_field_of_build_error(c, err), str(err)) from None
    for spec in specs:
        try:
            step_lib.check_attack(
                spec, c.workers, c.byzantine, sim.d, ds.feature_shape, ds.num_classes
            )
        except ValueError as err:
            raise ConfigError("attack", str(err)) from None
    return Setup(
        config=c,
        dataset=ds,
        data=device_data(ds.x_train, ds.y_train, table, sizes),
        x_test=jnp.asarray(ds.x_test),
        y_test=jnp.asarray(ds.y_test, jnp.int32),
        sim=sim,
    )


def make_chunk(sim: step_lib.Simulator, length: int, batched: bool = False):
    """The jitted ``chunk(state, hparams, data) -> (state, metrics[length])``.

    The state is donated. With `batched`, state and hparams carry a leading run
    axis and the data are shared.
    """

    def chunk(state, hp, data_):
        return lax.scan(lambda s, _: sim.step(s, hp, data_), state, None, length=length)

    if batched:
        chunk = jax.vmap(chunk, in_axes=(0, 0, None))
    return jax.jit(chunk, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _jitted_eval(evaluate: Callable, batched: bool) -> Callable:
    """One jitted evaluation per model (`ModelFns.evaluate` is cached per model)."""
    return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)) if batched else evaluate)


def _progress(enabled: bool, total: int, description: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} steps/s"),
        TextColumn("test acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )
    task = progress.add_task(description, total=total, rate="-", acc="-")
    return progress, task


def _window_record(step: int, window: list[dict], b: int | None) -> dict:
    """Means over the steps since the last record (of run b when batched)."""
    rec: dict[str, Any] = {"step": step}
    for key in METRICS:
        parts = [np.asarray(m[key] if b is None else m[key][b]) for m in window]
        values = np.concatenate([np.atleast_1d(p) for p in parts])
        rec[key] = float(np.mean(values))
        if key == "ip":
            rec["ip_neg_frac"] = float(np.mean(values < 0))
        if key == "finite":
            rec[key] = float(np.min(values))
    return rec


# The chunk programs compiled in this process, by their StableHLO text: a run
# whose program is one compiled before (another seed, or any change that reaches
# the program only as an argument: the seed, a learning rate, the data) skips
# its compilation (3.9 s for a small MLP run on the 2-core Xeon). The last few
# are kept: each holds its executable's code.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEEP = 8


def _compiled(lowered) -> tuple[Any, bool]:
    """(lowered.compile(), whether it came from `_COMPILED`)."""
    key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], True
    _COMPILED[key] = compiled = lowered.compile()
    while len(_COMPILED) > _COMPILED_KEEP:
        _COMPILED.popitem(last=False)
    return compiled, False


def _train(
    setup: Setup,
    states,
    hps,
    *,
    batch: int | None,
    labels: Sequence[str],
    progress: bool,
    on_record: Callable[[int, list[dict]], None] | None = None,
):
    """Runs all chunks; returns (states, records per run, timing dict)."""
    c, sim = setup.config, setup.sim
    length = chunk_length(c)
    batched = batch is not None
    chunk = make_chunk(sim, length, batched)
    evaluate = _jitted_eval(sim.evaluate, batched)
    traces_before = sim.traces()
    t0 = time.perf_counter()
    compiled, cached = _compiled(chunk.lower(states, hps, setup.data))
    compile_s = time.perf_counter() - t0
    traces = sim.traces() - traces_before
    n_runs = batch or 1
    records: list[list[dict]] = [[] for _ in range(n_runs)]

    eval_s = 0.0

    def do_eval(step: int) -> list[tuple[float, float]]:
        nonlocal eval_s
        t = time.perf_counter()
        loss, acc = jax.device_get(evaluate(states.theta, setup.x_test, setup.y_test))
        eval_s += time.perf_counter() - t
        loss, acc = np.atleast_1d(loss), np.atleast_1d(acc)
        return [(float(loss[i]), float(acc[i])) for i in range(n_runs)]

    first = do_eval(0)
    for i in range(n_runs):
        records[i].append(
            {"step": 0, "test_loss": first[i][0], "test_accuracy": first[i][1]}
        )
    bar, task = _progress(progress, c.steps, ", ".join(labels)[:60])
    step, window = 0, []
    train_s = 0.0
    with bar:
        while step < c.steps:
            t = time.perf_counter()
            states, metrics = compiled(states, hps, setup.data)
            metrics = jax.device_get(metrics)
            train_s += time.perf_counter() - t
            step += length
            window.append(metrics)
            fresh = []
            if step % c.log_every == 0 or step == c.steps:
                for i in range(n_runs):
                    rec = _window_record(step, window, i if batched else None)
                    records[i].append(rec)
                    fresh.append(rec)
                window = []
            if step % c.eval_every == 0 or step == c.steps:
                evals = do_eval(step)
                for i in range(n_runs):
                    rec = records[i][-1]
                    if rec["step"] != step:
                        rec = {"step": step}
                        records[i].append(rec)
                    rec["test_loss"], rec["test_accuracy"] = evals[i]
                accs = " ".join(f"{e[1]:.3f}" for e in evals[:4])
                bar.update(task, acc=accs)
            bar.update(task, completed=step, rate=f"{step / max(train_s, 1e-9):.1f}")
            if on_record is not None and fresh:
                on_record(step, fresh)
    timing = {
        "compile_s": compile_s,
        "compile_cached": cached,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps_per_s": c.steps / max(train_s, 1e-9),
        "traces": traces,
        "chunk": length,
    }
    return states, records, timing


def _environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "jax": jax.__version__,
    }


def _summary(config: Config, records: list[dict], timing: dict, d: int) -> dict:
    last_eval = next(r for r in reversed(records) if "test_accuracy" in r)
    last_log = next((r for r in reversed(records) if "loss" in r), {})
    return {
        "label": config.label(),
        "steps": config.steps,
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "loss": last_log.get("loss"),
        "d": d,
        **timing,
        **_environment(),
        "config": config.to_dict(),
    }


def _write(out: Path, config: Config, records, summary) -> None:
    from byzjax import records as records_lib
    from byzjax.sim.config import to_toml

    writer = records_lib.RunWriter(out)
    writer.write_config(to_toml(config))
    writer.append(records)
    writer.write_summary(summary)
    try:
        from byzjax import plotting

        plotting.plot_curves(
            {f"seed {config.seed}": records}, out / "curves.png", config.label()
        )
    except ImportError:  # matplotlib is an optional extra
        pass


def run(
    config: Config, *, progress: bool = True, write: bool = True, setup=None
) -> RunResult:
    """Validates, compiles and runs one configuration; writes its records.

    Args:
      config: the configuration.
      progress: show a rich progress bar.
      write: write metrics.jsonl, summary.json, config.toml and curves.png to
        ``config.out`` (or `default_out(config)`).
      setup: a Setup from `validate` (validated here when None).

    Returns:
      The RunResult.

    Raises:
      ConfigError: a bad configuration (before anything is compiled).
    """
    setup = setup or validate(config)
    sim = setup.sim
    state = sim.init(jax.random.key(config.seed))
    wall = time.perf_counter()
    state, records, timing = _train(
        setup,
        state,
        sim.hparams,
        batch=None,
        labels=[config.label()],
        progress=progress,
    )
    timing["wall_s"] = time.perf_counter() - wall
    records = records[0]
    summary = _summary(config, records, timing, sim.d)
    out = None
    if write:
        out = Path(config.out) if config.out else default_out(config)
        config = dataclasses.replace(config, out=str(out))
        summary["config"] = config.to_dict()
        _write(out, config, records, summary)
    return RunResult(config, records, summary, state, out)


def run_batch(
    config: Config,
    *,
    attacks_: Sequence[tuple[str, dict]],
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> list[list[RunResult]]:
    """Runs every (attack, seed) pair of one rule as ONE vmapped, compiled program.

    The gradient attacks are switched by ``hparams["attack_index"]`` (see
    `byzjax.sim.step.build`), and the seeds are stacked train states.

    Args:
      config: the shared configuration (its `attack` is ignored).
      attacks_: ``(name, params)`` gradient attacks or "none".
      seeds: PRNG seeds.
      progress: show a progress bar.

    Returns:
      ``results[a][s]`` for attack a and seed s (nothing is written to disk).
    """
    setup = validate(config, attacks_=attacks_)
    sim = setup.sim
    pairs = [(a, s) for a in range(len(attacks_)) for s in seeds]
    states = _stack_states(sim, [s for _, s in pairs])
    hps = jax.tree.map(lambda v: jnp.stack([v] * len(pairs)), sim.hparams)
    hps["attack_index"] = jnp.asarray([a for a, _ in pairs], jnp.int32)
    labels = [f"{attacks_[a][0]}/s{s}" for a, s in pairs]
    wall = time.perf_counter()
    states, records, timing = _train(
        setup,
        states,
        hps,
        batch=len(pairs),
        labels=[config.aggregator],
        progress=progress,
    )
    timing["wall_s"] = time.perf_counter() - wall
    timing["runs_in_batch"] = len(pairs)
    results: list[list[RunResult]] = [[] for _ in attacks_]
    for i, (a, s) in enumerate(pairs):
        name, params = attacks_[a]
        cfg = dataclasses.replace(
            config, attack=name, attack_params=dict(params), seed=s
        )
        summary = _summary(cfg, records[i], timing, sim.d)
        summary["label"] = labels[i]
        state_i = jax.tree.map(lambda v, i=i: v[i], states)
        results[a].append(RunResult(cfg, records[i], summary, state_i, None))
    return results


def _stack_states(sim: step_lib.Simulator, seeds: Sequence[int]):
    """Initial states of several seeds, stacked along a leading run axis."""
    states = [sim.init(jax.random.key(s)) for s in seeds]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
