"""The simulator: a Byzantine SGD step as one XLA program, a run as one scan.

`validate(config)` checks a `Config` and builds its `Simulator` before anything is
compiled; `run(config)` trains and writes the records; `run_batch` runs several
seeds and gradient attacks of one rule as one vmapped program. The building blocks
(`build`, `make_chunk`, the diagnostics) are pure functions for sweeps of your own.
"""

from __future__ import annotations

from byzjax.sim import diagnostics
from byzjax.sim.config import Config, ConfigError, apply_overrides, parse_value
from byzjax.sim.config import load as load_config
from byzjax.sim.diagnostics import METRICS
from byzjax.sim.loop import (
    RunResult,
    Setup,
    chunk_length,
    default_out,
    make_chunk,
    run,
    run_batch,
    validate,
)
from byzjax.sim.step import AttackSpec, Simulator, TrainState, build, resolve_attack
from byzjax.sim.worker import WorkerData, device_data, sample_batches

__all__ = [
    "METRICS",
    "AttackSpec",
    "Config",
    "ConfigError",
    "RunResult",
    "Setup",
    "Simulator",
    "TrainState",
    "WorkerData",
    "apply_overrides",
    "build",
    "chunk_length",
    "default_out",
    "device_data",
    "diagnostics",
    "load_config",
    "make_chunk",
    "parse_value",
    "resolve_attack",
    "run",
    "run_batch",
    "sample_batches",
    "validate",
]
