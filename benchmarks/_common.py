"""Shared timing helpers of the benchmarks: honest timings, hardware records.

Inputs are passed to the jitted function as arguments (a closed-over array is a
constant that XLA may fold, and the timing would be fiction); compile time is
measured apart from the warm runs; every run ends with `block_until_ready`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib

from byzjax import _native
from byzjax._native import cpu_info


def hardware() -> dict:
    """Device, CPU model and versions, recorded with every measurement."""
    info = cpu_info()
    cpu = info.get("model name", platform.processor())
    flags = info.get("flags", "").split()
    vector = next(
        (
            name
            for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
            if flag in flags
        ),
        "no AVX2",
    )
    # The model name alone does not tell the machines apart (a VM may report only
    # "Intel(R) Xeon(R) Processor"): family, model and the widest vector unit do.
    isa = (
        f"family {info.get('cpu family', '?')} model {info.get('model', '?')}, {vector}"
    )
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        # Which forms of the rules ran: the CPU kernels, or the pure-XLA forms
        # (every accelerator; a CPU with BYZJAX_NATIVE=0 or no C++ compiler).
        "forms": "kernels" if dev.platform == "cpu" and _native.enabled() else "xla",
        "device": dev.device_kind,
        "cpu": cpu,
        "cpu_isa": isa,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        # The malloc settings the scripts restart with (byzjax/_allocator.py);
        # a ByzFL subprocess inherits them.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def time_jitted(
    fn, *args, repeats: int = 5, budget_s: float = 3.0, slow_s: float = 5.0
) -> dict:
    """Compile seconds, median warm seconds and temp bytes of `jax.jit(fn)(*args)`.

    A call slower than `budget_s / repeats` in the warm-up gets fewer repeats (never
    fewer than 3), and one slower than `slow_s` (the optimized attacks' searches at
    n = 100) a single timed run, which keeps a full grid bounded; `runs` records how
    many were taken.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    first = time.perf_counter() - start
    repeats = max(min(repeats, 3), min(repeats, int(budget_s / max(first, 1e-9))))
    if first > slow_s:
        repeats = 1
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    temp = None
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    return {
        "compile_s": compile_s,
        "seconds": statistics.median(runs),
        "runs": len(runs),
        "temp": temp,
    }


def floor_candidates(x: jax.Array) -> list[tuple]:
    """(fn, args) pairs that each read x once; the fastest is the read floor.

    `ones @ x` and row-by-row sums. For a dtype narrower than float32 also both of
    a float32 array of the same bytes: XLA:CPU has no fast bfloat16 read kernel
    (its best bfloat16 row sum of (25, 1e6) took 69 ms, with float32 conversions
    inside, against 3 to 6 ms to read the same 50 MB as float32), so the floor of a
    bfloat16 input is the time the memory system needs for its bytes.
    """
    ones = jnp.ones((x.shape[0],), x.dtype)

    def matvec(o, x):
        return jnp.matmul(o, x, precision=jax.lax.Precision.HIGHEST)

    def rows(x):
        total = x[0]
        for i in range(1, x.shape[0]):
            total = total + x[i]
        return total

    candidates = [(matvec, (ones, x)), (rows, (x,))]
    if x.dtype.itemsize < 4:
        # Both forms: at n = 100 XLA's fused row sum reads 100 row streams at once,
        # which this CPU reads slower than `ones @ x` does (bfloat16 (100, 1e6): the
        # mean's kernel took 0.62x the row sum's time alone).
        words = x.shape[1] * x.dtype.itemsize // 4
        same_bytes = jnp.ones((x.shape[0], words), jnp.float32)
        ones_f32 = jnp.ones((x.shape[0],), jnp.float32)
        candidates += [(matvec, (ones_f32, same_bytes)), (rows, (same_bytes,))]
    return candidates


def _timed_candidates(x: jax.Array, repeats: int) -> list[tuple]:
    """(fn, args, seconds) of each of `floor_candidates(x)`, timed alone."""
    return [
        (fn, args, time_jitted(fn, *args, repeats=repeats)["seconds"])
        for fn, args in floor_candidates(x)
    ]


def read_floor(x: jax.Array, repeats: int = 5) -> float:
    """Seconds to read x once: the fastest of `floor_candidates(x)`."""
    return min(seconds for *_, seconds in _timed_candidates(x, repeats))


def read_form(x: jax.Array, repeats: int = 3) -> tuple:
    """(fn, args) of the fastest of `floor_candidates(x)`, timed alone: the form
    to alternate with other calls."""
    fn, args, _ = min(_timed_candidates(x, repeats), key=lambda c: c[2])
    return fn, args


def alternate(calls, repeats: int) -> list[float]:
    """Median seconds of each (fn, args), the calls alternated round by round.

    A machine that slows down mid-run slows every form alike, so ratios between
    them hold where separate timings drift (up to 1.5x between runs on the 2-core
    VM of docs/benchmarks.md).
    """
    compiled = [(jax.jit(fn).lower(*args).compile(), args) for fn, args in calls]
    for fn, args in compiled:
        jax.block_until_ready(fn(*args))
    runs: list[list[float]] = [[] for _ in compiled]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(compiled):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            runs[i].append(time.perf_counter() - start)
    return [statistics.median(r) for r in runs]


def copy_floor(x: jax.Array, repeats: int = 5) -> float:
    """Seconds of `x + 1`: every element read and written once, the device's copy
    (a GPU's device-to-device copy peak is the performance issue's bandwidth
    figure; `x + 1` cannot be folded away or aliased to its input)."""
    return time_jitted(lambda x: x + 1, x, repeats=repeats)["seconds"]


def gram_floor(x: jax.Array, repeats: int = 5) -> float:
    """Seconds of the Gram matrix x x^T at full float32 precision (HIGHEST: no
    TF32 on a GPU), products accumulated in float32: the distance rules' floor."""

    def gram(x):
        return jnp.matmul(
            x,
            x.T,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    return time_jitted(gram, x, repeats=repeats)["seconds"]


def paired_floor(fn, x: jax.Array, repeats: int = 9) -> tuple[float, float]:
    """(seconds of fn(x), read-floor seconds), alternated with the floor forms that
    can be the floor: those within 1.5x of the fastest, timed alone first.

    The others only disturb the measure: a bfloat16 input's `ones @ x` and row sum
    took 34-36 ms against 1.6-4 ms for its bytes read as float32, and between the
    calls they pushed the input out of the 2-core Xeon's L3 (the mean of (25, 1e6)
    bfloat16 took 5.3 ms alternated with them, 1.9 ms without, 1.6 ms alone).
    """
    timed = _timed_candidates(x, repeats=3)
    fastest = min(seconds for *_, seconds in timed)
    fast = [(form, args) for form, args, seconds in timed if seconds <= 1.5 * fastest]
    times = alternate([(fn, (x,)), *fast], repeats)
    return times[0], min(times[1:])


# Environment variables a record's command shows.
_COMMAND_ENV = ("BYZJAX_NATIVE", "BYZJAX_NATIVE_FLAGS")


def command() -> str:
    """The command line that produced a record, for the report, with the
    byzjax variables that change what runs (`BYZJAX_NATIVE=0`: the XLA forms)."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in _COMMAND_ENV]
    return " ".join([*env, "python", *sys.argv])


def emit(record: dict, out) -> None:
    """Writes one JSON line to `out` (a file object) and flushes it.

    The 1-minute load average goes with it: on a shared machine a line taken under
    load (load1 above the core count) is slower than the code is.
    """
    record = {**record, "load1": os.getloadavg()[0], "time": time.time()}
    out.write(json.dumps(record) + "\n")
    out.flush()
