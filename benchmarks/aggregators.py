"""Throughput of every registered rule, pre-aggregator and attack.

One JSON line per (kind, name, n, d, dtype): compile seconds, the median of warm
runs, GB/s (bytes of the (n, d) input read once / time) and the fraction of the read
floor measured in the same run on the same array (floor seconds / rule seconds; 1.0 =
at the floor). Pre-aggregators are timed chained before `mean`. The rules with a
read-floor target are timed once more alternated call by call with the floor forms
(`paired_floor_fraction`, 25 rounds): the machine's speed drifts between separate
timings.
With `--vmap B` each rule is also timed `jax.vmap`ped over B inputs of (n, d / B)
(a sweep's shape) against B calls on them one after the other (`vmap_ratio`).

On an accelerator (or with `--device-floors`) each shape also gets the floors of
the issue's GPU targets, measured in the same run: a copy of the input (`x + 1`,
read and written: `copy_fraction` = the rule's read rate over the copy's rate)
and its Gram matrix at full float32 precision (`gram_ratio` = the rule's time
over the Gram's). `--memory` then runs every rule once on an input of half the
device's memory (`--memory-bytes` to choose it), n = 100: the target that nothing
runs out of memory when the input fits twice.

  python benchmarks/aggregators.py --n 25 100 --d 1e5 1e6 \
      --dtype float32 bfloat16 --out benchmarks/results/aggregators.jsonl
  python benchmarks/aggregators.py --quick --rules median krum
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import byzjax
from byzjax._allocator import reexec_tuned

if __package__ in (None, ""):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (  # noqa: E402
    command,
    copy_floor,
    emit,
    gram_floor,
    hardware,
    paired_floor,
    read_floor,
    time_jitted,
)
from report import FLOOR_RULES  # noqa: E402  (rules with a read-floor target)

# Hyperparameters that a rule cannot do without (tau has no default).
RULE_PARAMS = {"centered_clipping": {"tau": 1.0}}
PRE_PARAMS = {"clipping": {"tau": 1.0}}
ATTACK_PARAMS = {"sign_flip": {}, "fang": {}}


def default_f(name: str, n: int) -> int:
    """A Byzantine count valid for the rule: n // 4 - 1, lowered to its bound."""
    f = max(n // 4 - 1, 1)
    if name == "bulyan":
        f = min(f, (n - 3) // 4)
    if name in ("krum", "multi_krum"):
        f = min(f, (n - 3) // 2)
    return f


def _rule_fn(agg):
    def fn(x):
        return agg.update(x, agg.init(x), agg.default_params)[0]

    return fn


def cases(kinds, names):
    for name in byzjax.aggregators.names():
        if "rule" in kinds and (not names or name in names):
            yield "rule", name
    for name in byzjax.aggregators.pre_names():
        if "pre" in kinds and (not names or name in names):
            yield "pre", name
    for name in byzjax.attacks.names():
        if "attack" in kinds and (not names or name in names):
            yield "attack", name


def measure(kind, name, x, f, repeats):
    if kind == "rule":
        agg = byzjax.aggregators.build(name, f=f, **RULE_PARAMS.get(name, {}))
        return time_jitted(_rule_fn(agg), x, repeats=repeats)
    if kind == "pre":
        agg = byzjax.aggregators.build(
            "mean", f=f, pre=[(name, PRE_PARAMS.get(name, {}))]
        )
        return time_jitted(_rule_fn(agg), x, repeats=repeats)
    atk = byzjax.attacks.build(name, **ATTACK_PARAMS.get(name, {}))
    honest = x[f:]
    key = jax.random.key(0)
    return time_jitted(
        lambda k, h: atk.apply(k, h, atk.default_params, f),
        key,
        honest,
        repeats=repeats,
    )


def paired(name, x, f, repeats: int = 25) -> dict:
    """The rule and the read floor alternated call by call (see `alternate`): 25
    rounds, the median of each. 9 rounds were too few on the Intel Xeon VM, whose
    slow stretches last about as long: the sign majority of (25, 1e6) read 2.17x
    the floor in a 9-round grid and 0.94-0.96x in 30-round runs minutes apart."""
    agg = byzjax.aggregators.build(name, f=f, **RULE_PARAMS.get(name, {}))
    rule_s, floor_s = paired_floor(_rule_fn(agg), x, repeats)
    return {
        "paired_s": rule_s,
        "paired_floor_s": floor_s,
        "paired_floor_fraction": floor_s / rule_s,
    }


def vmapped(name, x, f, batch: int, repeats: int) -> dict:
    """The rule vmapped over `batch` inputs of (n, d // batch), against the same
    inputs aggregated one call at a time: what a sweep costs beyond its inputs."""
    n, d = x.shape
    width = d // batch
    xb = jnp.stack([x[:, i * width : (i + 1) * width] for i in range(batch)])
    # Each input its own stored array, as a caller would pass it (`+ 0`: not a
    # view of xb).
    parts = [jax.block_until_ready(xb[i] + 0) for i in range(batch)]
    agg = byzjax.aggregators.build(name, f=f, **RULE_PARAMS.get(name, {}))
    rule = _rule_fn(agg)
    together = time_jitted(jax.vmap(rule), xb, repeats=repeats)["seconds"]
    one = jax.jit(rule).lower(parts[0]).compile()
    jax.block_until_ready(one(parts[0]))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for part in parts:
            jax.block_until_ready(one(part))
        runs.append(time.perf_counter() - start)
    each = statistics.median(runs)
    return {
        "vmap_batch": batch,
        "vmapped_s": together,
        "each_s": each,
        "vmap_ratio": together / each,
    }


def device_floors(x, repeats: int) -> dict:
    """The copy and Gram floors of x (`copy_floor`, `gram_floor`)."""
    return {"copy_s": copy_floor(x, repeats), "gram_s": gram_floor(x, repeats)}


def against_device_floors(seconds: float, floors: dict) -> dict:
    """A rule's time against the device floors: its read rate over the copy's
    (which moves twice the input's bytes), its time over the Gram matrix's."""
    return {
        **floors,
        "copy_fraction": floors["copy_s"] / (2 * seconds),
        "gram_ratio": seconds / floors["gram_s"],
    }


def error_text(err: Exception) -> str:
    """A failed case's error as its record keeps it."""
    return f"{type(err).__name__}: {err}"[:300]


def memory_input(n: int, d: int, dtype):
    """An (n, d) input made on the device in one fused loop (no host copy, no
    random bits beside it): distinct rows and columns."""

    def make():
        rows = jax.lax.broadcasted_iota(jnp.float32, (n, d), 0)
        cols = jax.lax.broadcasted_iota(jnp.float32, (n, d), 1)
        return jnp.sin(cols * 1e-3 + rows * 1.7).astype(dtype)

    return jax.jit(make)()


def memory_check(kinds, names, dtype, nbytes: int, hw: dict, out) -> None:
    """Every rule (and pre-aggregator, attack) once on an (100, d) input of
    `nbytes`: whether it runs, or its error (out of memory, say)."""
    n = 100
    d = int(nbytes // (n * jnp.dtype(dtype).itemsize))
    x = memory_input(n, d, dtype)
    for kind, name in cases(kinds, names):
        f = default_f(name, n)
        rec = {**hw, "kind": "memory", "case": kind, "name": name, "n": n, "d": d}
        rec.update(f=f, dtype=dtype, input_bytes=n * d * jnp.dtype(dtype).itemsize)
        try:
            t = measure(kind, name, x, f, repeats=1)
            rec.update(ok=True, seconds=t["seconds"], compile_s=t["compile_s"])
        except Exception as err:  # noqa: BLE001 - recorded, go on
            rec.update(ok=False, error=error_text(err))
        emit(rec, out)
        print(
            f"memory {name:20s} n={n} d={d} {dtype}: "
            f"{'ok' if rec['ok'] else rec['error']}",
            file=sys.stderr,
            flush=True,
        )


def memory_bytes(requested: float | None) -> int:
    """Half the device's memory (its allocator's limit) unless `requested`."""
    if requested:
        return int(requested)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise SystemExit(
            "--memory: this device reports no memory limit; pass --memory-bytes"
        )
    return int(stats["bytes_limit"]) // 2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[25, 100])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--kinds", nargs="+", default=["rule", "pre", "attack"])
    p.add_argument("--rules", "--names", dest="names", nargs="*", default=[])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--vmap", type=int, default=0, help="also time the rules vmapped over B inputs"
    )
    p.add_argument(
        "--quick", action="store_true", help="n=25, d=1e5, float32 (a smoke run)"
    )
    p.add_argument(
        "--device-floors",
        action="store_true",
        help="the copy and Gram floors too (on by default off the CPU)",
    )
    p.add_argument(
        "--memory", action="store_true", help="every rule once on half the memory"
    )
    p.add_argument("--memory-bytes", type=float, help="the input's bytes there")
    p.add_argument("--skip-grid", action="store_true", help="only --memory")
    p.add_argument("--out", default="benchmarks/results/aggregators.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.dtype = [25], [1e5], ["float32"]
    hw = {**hardware(), "command": command()}
    on_device = args.device_floors or jax.devices()[0].platform != "cpu"
    with open(args.out, "a") as out:
        if not args.skip_grid:
            grid(args, hw, on_device, out)
        if args.memory:
            nbytes = memory_bytes(args.memory_bytes)
            for dtype in args.dtype:
                memory_check(args.kinds, args.names, dtype, nbytes, hw, out)


def grid(args, hw: dict, on_device: bool, out) -> None:
    """Every case over the (n, d, dtype) grid, one JSON line each; with the
    device floors where `on_device`."""
    for dtype in args.dtype:
        for n in args.n:
            for d in map(int, args.d):
                x = grid_input(n, d, dtype)
                floor = read_floor(x, args.repeats)
                gb = n * d * x.dtype.itemsize / 1e9
                line = {**hw, "kind": "floor", "n": n, "d": d, "dtype": dtype}
                emit(
                    {**line, "name": "read", "seconds": floor, "gbps": gb / floor}, out
                )
                floors = device_floors(x, args.repeats) if on_device else {}
                if floors:
                    copy_s, gram_s = floors["copy_s"], floors["gram_s"]
                    # The copy moves the input's bytes twice: read and written.
                    copy_gbps = 2 * gb / copy_s
                    emit(
                        {**line, "name": "copy", "seconds": copy_s, "gbps": copy_gbps},
                        out,
                    )
                    emit({**line, "name": "gram", "seconds": gram_s}, out)
                for kind, name in cases(args.kinds, args.names):
                    f = default_f(name, n)
                    rec = {**hw, "kind": kind, "name": name, "n": n, "d": d, "f": f}
                    rec.update(dtype=dtype, floor_s=floor)
                    try:
                        t = measure(kind, name, x, f, args.repeats)
                        rec.update(
                            t,
                            gbps=gb / t["seconds"],
                            floor_fraction=floor / t["seconds"],
                        )
                        if floors:
                            rec.update(against_device_floors(t["seconds"], floors))
                        if kind == "rule" and name in FLOOR_RULES:
                            rec.update(paired(name, x, f))
                        if kind == "rule" and args.vmap:
                            rec.update(vmapped(name, x, f, args.vmap, args.repeats))
                    except Exception as err:  # noqa: BLE001 - recorded, go on
                        rec["error"] = error_text(err)
                        if "max_subsets" in str(err):  # mda's C(n, f) budget
                            rec["skipped"] = "C(n, f) above mda's budget"
                    emit(rec, out)
                    print(
                        f"{kind:6s} {name:20s} n={n} d={d} {dtype}: "
                        f"{rec.get('seconds', float('nan')) * 1e3:9.1f} ms "
                        f"({rec.get('floor_fraction', 0):.2f} of floor) "
                        f"{rec.get('error', '')}",
                        file=sys.stderr,
                        flush=True,
                    )


def grid_input(n: int, d: int, dtype):
    """Gaussian rows: from NumPy on the CPU (the records' inputs since session 1),
    drawn on the device elsewhere (a host draw of (128, 1e7) takes seconds)."""
    if jax.devices()[0].platform != "cpu":
        key = jax.random.key(0)
        return jax.jit(lambda k: jax.random.normal(k, (n, d)).astype(dtype))(key)
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, d)), dtype=dtype)


if __name__ == "__main__":
    reexec_tuned()
    main()
