"""byzjax against ByzFL 0.0.11 (PyTorch, CPU), same shapes, side by side in one run.

ByzFL lives in its own virtual environment (.byzfl-venv, created on first use:
`pip install torch==2.13.0`, then `byzfl==0.0.11 torch==2.13.0`). `import byzfl`
imports its federated framework and with it torchvision, whose PyPI build fails next
to CPU torch (`operator torchvision::nms does not exist`); the child process
therefore registers `byzfl` as a bare namespace and imports only
`byzfl.aggregators` and `byzfl.attacks`, which need torch and numpy alone.

Each ByzFL object is built with the settings of the byzjax rule it is paired with
(ByzFL parity presets where outputs differ: Krum's neighbour count and geometric
median's start/nu/T; see docs/conventions.md). Speed ratio = ByzFL s / byzjax s:
the medians of `--repeats` rounds of one byzjax call, one ByzFL call (in the
child, which holds the same rows and times each call on request) and one read of
the input, alternated, so that the machine's drift slows all three alike.

The training step (25 workers, MLP 784-100-10, batch 50, ALIE, Krum and median) is
timed both ways too: byzjax's simulator against the equivalent PyTorch loop built
from ByzFL's objects (`TRAIN_CHILD`).

  python benchmarks/compare_byzfl.py --n 25 100 --d 1e6 \
      --out benchmarks/results/byzfl.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aggregators as bench  # noqa: E402
from _common import command, emit, hardware, read_form  # noqa: E402

from byzjax._allocator import reexec_tuned  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".byzfl-venv")

# (kind, byzjax name, byzjax params, ByzFL expression with f, a label)
PAIRS = [
    ("rule", "mean", {}, "agg.Average()"),
    ("rule", "median", {}, "agg.Median()"),
    ("rule", "trimmed_mean", {}, "agg.TrMean(f=f)"),
    ("rule", "mean_around_median", {}, "agg.Meamed(f=f)"),
    ("rule", "geometric_median", {"preset": "byzfl"}, "agg.GeometricMedian(0.1, 3)"),
    ("rule", "krum", {"variant": "byzfl"}, "agg.Krum(f=f)"),
    ("rule", "multi_krum", {"variant": "byzfl"}, "agg.MultiKrum(f=f)"),
    ("rule", "centered_clipping", {"tau": 100.0}, "agg.CenteredClipping(tau=100.0)"),
    ("pre", "nnm", {}, "agg.NNM(f=f)"),
    ("pre", "arc", {}, "agg.ARC(f=f)"),
    ("pre", "clipping", {"tau": 2.0}, "agg.Clipping(c=2.0)"),
    ("attack", "alie", {"z": 1.5}, "atk.ALittleIsEnough(tau=1.5)"),
    ("attack", "ipm", {"eps": 1.0}, "atk.InnerProductManipulation(tau=2.0)"),
    ("attack", "sign_flip", {}, "atk.SignFlipping()"),
]

# `import byzfl` would import torchvision (see the module docstring): register a bare
# `byzfl` namespace and import only the aggregators and attacks.
IMPORT_BYZFL = textwrap.dedent(
    """
    import importlib.util, sys, types
    spec = importlib.util.find_spec("byzfl")
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = pkg
    import byzfl.aggregators as agg, byzfl.attacks as atk
    """
)

# A ByzFL server: it holds the (n, d) rows and times one call of a paired object
# per request line (its name, expression and kind), so that the parent can
# alternate it with byzjax's call and the read floor, round by round.
CHILD = IMPORT_BYZFL + textwrap.dedent(
    """
    import json, time
    import numpy as np, torch
    n, d, f = (int(a) for a in sys.argv[1:4])
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    x = torch.from_numpy(x)
    calls = {}
    for line in sys.stdin:
        name, expr, kind = json.loads(line)
        if name not in calls:
            obj = eval(expr)
            arg = x[f:] if kind == "attack" else x
            # ARC and Clipping clip their input in place: after one call every
            # later call would see clipped rows and skip the work, so each call
            # gets a fresh copy, made outside the timer.
            copy = name in ("arc", "clipping")
            fresh = (lambda a=arg: a.clone()) if copy else (lambda a=arg: a)
            obj(fresh())  # warm-up
            calls[name] = (obj, fresh)
        obj, fresh = calls[name]
        a = fresh()
        t = time.perf_counter(); obj(a); seconds = time.perf_counter() - t
        print(json.dumps(seconds), flush=True)
    """
)


# ByzFL's training loop cannot be imported here (its framework imports torchvision),
# so this is the same loop written with ByzFL's own aggregator and attack objects,
# as ByzFL's `Client`/`Server` run it: every honest worker computes its gradient on
# its own minibatch one after another (one backward each), the attack builds one
# vector from the honest ones that the f Byzantine workers all send, the server
# aggregates the n flat vectors, unflattens them and takes an SGD step. The inputs
# are random MNIST-shaped data: speed does not depend on the pixel values.
TRAIN_CHILD = IMPORT_BYZFL + textwrap.dedent(
    """
    import json, time
    import torch
    n, f, batch, steps = (int(a) for a in sys.argv[1:5])
    rule = sys.argv[5]
    torch.manual_seed(0)
    xs, ys = torch.randn(5000, 784), torch.randint(0, 10, (5000,))
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
    )
    params = list(model.parameters())
    aggregator = {"krum": agg.Krum(f=f), "median": agg.Median()}[rule]
    attack = atk.ALittleIsEnough(tau=1.5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        grads = []
        for _ in range(n - f):
            idx = torch.randint(0, 5000, (batch,))
            model.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        honest = torch.stack(grads)
        byz = attack(honest)
        out = aggregator(torch.cat([honest, byz.expand(f, -1)]))
        with torch.no_grad():
            start = 0
            for p in params:
                p -= 0.1 * out[start : start + p.numel()].reshape(p.shape)
                start += p.numel()

    for _ in range(10):
        step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t
    print(json.dumps({"rule": rule, "steps_per_s": steps / seconds}), flush=True)
    """
)


def ensure_venv() -> str:
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        # pip, not uv: the CPU wheel of torch 2.13.0 is found on this machine's disk,
        # where uv would download a CUDA build of several GB.
        pip = [python, "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["byzfl==0.0.11", "torch==2.13.0"], check=True)
    return python


class ByzFL:
    """The ByzFL child (`CHILD`) over the rows of one (n, d, f)."""

    def __init__(self, python, n, d, f):
        self.proc = subprocess.Popen(
            [python, "-c", CHILD, str(n), str(d), str(f)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )

    def call(self, name, expr, kind) -> float:
        """Seconds of one call (the first one of a name warms it up first)."""
        self.proc.stdin.write(json.dumps([name, expr, kind]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the ByzFL child exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def nnm_gib(n, d, f) -> float:
    """ByzFL's NNM gathers an (n, n - f, d) float32 tensor."""
    return n * (n - f) * d * 4 / 2**30


def byzfl_train(python, rule, n, f, batch, steps):
    out = subprocess.run(
        [python, "-c", TRAIN_CHILD, str(n), str(f), str(batch), str(steps), rule],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout
    return json.loads(out.splitlines()[-1])["steps_per_s"]


def byzjax_train(rule, n, f, batch, steps):
    """Steps/s of byzjax's simulator step in the same setting (see train_step.py)."""
    import dataclasses

    from byzjax import sim

    cfg = dataclasses.replace(
        sim.Config(),
        dataset="mnist5k",
        model="mlp",
        workers=n,
        byzantine=f,
        attack="alie",
        aggregator=rule,
        batch_size=batch,
        steps=steps,
        eval_every=steps,
        log_every=steps,
        influence=False,
    )
    return sim.run(cfg, progress=False, write=False).summary["steps_per_s"]


def train_compare(python, hw, out, steps):
    n, f, batch = 25, 5, 50
    for rule in ("krum", "median"):
        theirs = byzfl_train(python, rule, n, f, batch, max(steps // 5, 20))
        ours = byzjax_train(rule, n, f, batch, steps)
        rec = {
            **hw,
            "kind": "train",
            "name": rule,
            "attack": "alie",
            "n": n,
            "f": f,
            "batch": batch,
            "byzfl_steps_per_s": theirs,
            "byzjax_steps_per_s": ours,
            "ratio": ours / theirs,
        }
        emit(rec, out)
        print(
            f"train {rule:8s}: byzjax {ours:7.1f} steps/s  byzfl {theirs:6.1f} "
            f"steps/s  x{ours / theirs:.1f}",
            file=sys.stderr,
            flush=True,
        )


def byzjax_call(kind, name, params, x, f):
    """(fn, args) of byzjax's call paired with ByzFL's."""
    if kind == "rule":
        agg = bench.byzjax.aggregators.build(name, f=f, **params)
        return bench._rule_fn(agg), (x,)
    if kind == "pre":
        agg = bench.byzjax.aggregators.build("mean", f=f, pre=[(name, params)])
        return bench._rule_fn(agg), (x,)
    # ByzFL's attacks return the one vector all f Byzantine workers send (its
    # framework hands out f references to it); byzjax returns the (f, d) rows, whose
    # writing alone is ~54 ms at f = 24, d = 1e6 here. Timing row 0 compares the
    # same output: XLA then computes only the shared vector.
    atk = bench.byzjax.attacks.build(name, **params)
    return (
        lambda k, h: atk.apply(k, h, atk.default_params, f)[0],
        (bench.jax.random.key(0), x[f:]),
    )


def _ready(fn, args):
    """fn compiled for args and called once: a timer of one warm call."""
    compiled = bench.jax.jit(fn).lower(*args).compile()
    bench.jax.block_until_ready(compiled(*args))

    def timed() -> float:
        start = time.perf_counter()
        bench.jax.block_until_ready(compiled(*args))
        return time.perf_counter() - start

    return timed


def alternated(byzfl, kind, name, params, expr, x, f, floor, rounds):
    """Median seconds of byzjax's call, ByzFL's and the read floor's, one of each
    a round: the VM's speed drifts up to 2x within minutes, and a ratio taken
    from timings minutes apart drifted with it (session 23)."""
    ours = _ready(*byzjax_call(kind, name, params, x, f))
    byzfl.call(name, expr, kind)  # its warm-up

    def theirs() -> float:
        seconds = byzfl.call(name, expr, kind)
        # torch's worker threads spin a while after a parallel call before they
        # sleep: the next call here must not share the cores with them.
        time.sleep(0.02)
        return seconds

    # The order turns each round: a call right after the other process's, or
    # after a pause, may not run as it would after its own kind.
    timers = [ours, theirs, floor]
    times: list[list[float]] = [[], [], []]
    for r in range(rounds):
        for i in [(r + j) % 3 for j in range(3)]:
            times[i].append(timers[i]())
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[25, 100])
    p.add_argument("--d", type=float, nargs="+", default=[1e6])
    p.add_argument(
        "--repeats", type=int, default=6, help="rounds of the three calls alternated"
    )
    p.add_argument("--max-gib", type=float, default=12.0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--no-train", action="store_true", help="skip the training loops")
    p.add_argument("--quick", action="store_true", help="n=25, d=1e5")
    p.add_argument("--out", default="benchmarks/results/byzfl.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d = [25], [1e5]
    python = ensure_venv()
    hw = {**hardware(), "command": command()}
    with open(args.out, "a") as out:
        if not args.no_train:
            train_compare(python, hw, out, args.train_steps)
        for n in args.n:
            for d in map(int, args.d):
                f = n // 4 - 1
                x = jnp.asarray(np.random.default_rng(0).normal(size=(n, d)), "float32")
                # One read of each call's input (attacks read only the h honest
                # rows): a call near it cannot be made 10x faster. The fastest
                # form, timed alone, then alternated with the calls.
                floors = {
                    which: _ready(*read_form(rows))
                    for which, rows in (("all", x), ("honest", x[f:]))
                }
                byzfl = ByzFL(python, n, d, f)
                try:
                    for kind, name, params, expr in PAIRS:
                        rec = {
                            **hw,
                            "kind": kind,
                            "name": name,
                            "n": n,
                            "d": d,
                            "f": f,
                            "byzfl": expr,
                            "rounds": args.repeats,
                        }
                        floor = floors["honest" if kind == "attack" else "all"]
                        if name == "nnm" and nnm_gib(n, d, f) > args.max_gib:
                            rec["skipped"] = f"needs ~{nnm_gib(n, d, f):.0f} GiB"
                            ours = _ready(*byzjax_call(kind, name, params, x, f))
                            rec.update(
                                byzjax_s=statistics.median(
                                    ours() for _ in range(args.repeats)
                                ),
                                floor_s=statistics.median(
                                    floor() for _ in range(args.repeats)
                                ),
                            )
                        else:
                            ours, theirs, read = alternated(
                                byzfl,
                                kind,
                                name,
                                params,
                                expr,
                                x,
                                f,
                                floor,
                                args.repeats,
                            )
                            rec.update(
                                byzjax_s=ours,
                                byzfl_s=theirs,
                                floor_s=read,
                                ratio=theirs / ours,
                            )
                        emit(rec, out)
                        print(
                            f"{name:20s} n={n} d={d}: byzjax "
                            f"{rec['byzjax_s'] * 1e3:8.1f} ms  byzfl "
                            f"{rec.get('byzfl_s', float('nan')) * 1e3:8.1f} ms  "
                            f"x{rec.get('ratio', float('nan')):.1f} "
                            f"(read {rec['floor_s'] * 1e3:.1f} ms) "
                            f"{rec.get('skipped', '')}",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    byzfl.close()


if __name__ == "__main__":
    reexec_tuned()
    main()
