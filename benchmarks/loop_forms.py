"""The generated loops' CPU-dependent forms against each other, alternated in one run.

The coordinate-wise rules' loops (`byzjax/_native/networks.py`) take a form by the
CPU they run on: bfloat16 rows on 16-bit column pairs (`pair_loops`), networks
on integer order keys (`keyed_exchanges`), and rows prefetched into L2 as the
loop goes instead of column blocks (`streamed_loops`, "L2 prefetch"). Both forms
of each give the same bits; this
script times each rule's two forms on one array, call by call with a float32 read
of the same bytes, and writes one JSON line per (choice, rule, n, d, input), with
the form this CPU takes. A new machine runs it before those choices change.

  python benchmarks/loop_forms.py --out benchmarks/results/loop_forms.jsonl
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from byzjax._native import networks

if __package__ in (None, ""):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import alternate, command, emit, hardware  # noqa: E402

from byzjax._allocator import reexec_tuned  # noqa: E402

RULES = ("median", "trimmed_mean", "mean_around_median")
# The loops whose names (`pair_loops`, `keyed_exchanges`) are not their rules':
# at these f the mean around the median runs its window, as 2k >= n.
LOOPS = {"mean_around_median": "window"}


def sources(rule: str, n: int, dtype, **form) -> str:
    """The loop of `rule` over n rows at the benchmarks' f = n // 4 - 1 (the trimmed
    mean's b, the window's k = n - f), in the form given by `form`."""
    f = max(n // 4 - 1, 1)
    make = {
        "median": networks.median_source,
        "trimmed_mean": functools.partial(networks.trimmed_mean_source, b=f),
        "mean_around_median": functools.partial(networks.window_mean_source, k=n - f),
    }[rule]
    return make(n=n, dtype=dtype, **form)


def choices(n: int):
    """(choice, dtype, rule, form on, form off, whether this CPU takes it on)."""
    out = []
    if "avx512bw" in networks.cpu_info().get("flags", "").split() or (
        networks.native_width() == 8
    ):
        for rule in RULES:
            out.append(
                (
                    "column pairs",
                    jnp.bfloat16,
                    rule,
                    {"paired": True},
                    {"paired": False},
                    networks.pair_loops(jnp.bfloat16, LOOPS.get(rule, rule), n),
                )
            )
    for rule in RULES:
        if (
            LOOPS.get(rule, rule) in ("median", "window")
            or n > networks.FULL_NETWORK_MAX_N
        ):
            out.append(
                (
                    "order keys",
                    jnp.float32,
                    rule,
                    {"keyed": True},
                    {"keyed": False},
                    networks.keyed_exchanges(
                        n, networks.native_width(), LOOPS.get(rule, rule)
                    ),
                )
            )
    for dtype in (jnp.float32, jnp.bfloat16):
        for rule in RULES:
            out.append(
                (
                    "L2 prefetch",
                    dtype,
                    rule,
                    {"streamed": True},
                    {"streamed": False},
                    networks.streamed_loops(n, networks.native_width()),
                )
            )
    return out


def make_input(kind: str, n: int, d: int) -> np.ndarray:
    """Gaussian rows; `zeros`: half the columns all +0 (a zero input pixel's weight
    gradients); `signed zeros`: those with a -0 in every 64th column (the keyed and
    paired loops redo a step with a zero rank in a column holding one)."""
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    if kind != "gaussian":
        x[:, : d // 2] = 0.0
    if kind == "signed zeros":
        x[0, : d // 2 : 64] = -0.0
    return x


def _loop(source):
    return lambda x: networks.network_rule(x, source)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[25, 100])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--inputs", nargs="+", default=["gaussian", "zeros", "signed zeros"])
    p.add_argument(
        "--choices", nargs="+", default=["column pairs", "order keys", "L2 prefetch"]
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results/loop_forms.jsonl")
    args = p.parse_args(argv)
    hw = {**hardware(), "command": command()}
    with open(args.out, "a") as out:
        for n in args.n:
            for d in map(int, args.d):
                for kind in args.inputs:
                    x32 = make_input(kind, n, d)
                    for choice, dtype, rule, on, off, taken in choices(n):
                        if choice not in args.choices:
                            continue
                        x = jnp.asarray(x32).astype(dtype)
                        # The floor: a float32 read of the input's bytes.
                        words = d * x.dtype.itemsize // 4
                        read = (
                            lambda o, y: jnp.matmul(
                                o, y, precision=jax.lax.Precision.HIGHEST
                            ),
                            (jnp.ones((n,), jnp.float32), jnp.ones((n, words))),
                        )
                        a, b, floor = alternate(
                            [
                                (_loop(sources(rule, n, dtype, **on)), (x,)),
                                (_loop(sources(rule, n, dtype, **off)), (x,)),
                                read,
                            ],
                            args.repeats,
                        )
                        rec = {
                            **hw,
                            "kind": "loop_form",
                            "name": choice,
                            "rule": rule,
                            "n": n,
                            "d": d,
                            "dtype": jnp.dtype(dtype).name,
                            "input": kind,
                            "on_s": a,
                            "off_s": b,
                            "floor_s": floor,
                            "ratio": a / b,
                            "taken": bool(taken),
                        }
                        emit(rec, out)
                        print(
                            f"{choice:12s} {rule:18s} n={n} d={d:.0e} {kind:12s}: "
                            f"{a * 1e3:7.2f} vs {b * 1e3:7.2f} ms (floor "
                            f"{floor * 1e3:.2f}), {a / b:.2f}x"
                            f"{' (taken)' if taken else ''}",
                            file=sys.stderr,
                            flush=True,
                        )


if __name__ == "__main__":
    reexec_tuned()
    main()
