"""Steps/s and compile time of the simulator's training step, per rule.

The setting of ByzFL's reference loop: 25 workers, MLP 784-100-10 on MNIST-5k, batch
50 per worker, ALIE, server SGD; the step (honest gradients, attack, aggregation,
update, metrics) is one XLA program and the run a `lax.scan`. Steps/s is measured
over the scanned run after compilation (test evaluation only at the end), with the
influence VJP off unless `--influence`.

  python benchmarks/train_step.py --steps 300 --out benchmarks/results/train_step.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command, emit, hardware  # noqa: E402

from byzjax import sim  # noqa: E402
from byzjax._allocator import reexec_tuned  # noqa: E402

RULES = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "centered_clipping",
)
RULE_PARAMS = {"centered_clipping": {"tau": 1.0}}


def measure(rule, attack, workers, byzantine, steps, influence=False) -> dict:
    """Runs one configuration through `byzjax.sim.run`; its summary's timings.

    `run` compiles the scanned chunk ahead of time (`compile_s`) and times the warm
    chunk calls apart from compilation and evaluation (`steps_per_s`).
    """
    cfg = sim.Config(
        dataset="mnist5k",
        model="mlp",
        batch_size=50,
        workers=workers,
        byzantine=byzantine,
        attack=attack,
        aggregator=rule,
        aggregator_params=RULE_PARAMS.get(rule, {}),
        steps=steps,
        eval_every=steps,
        log_every=steps,
        influence=influence,
    )
    return sim.run(cfg, progress=False, write=False).summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--attack", default="alie")
    p.add_argument("--workers", type=int, default=25)
    p.add_argument("--byzantine", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--influence", action="store_true")
    p.add_argument("--quick", action="store_true", help="mean and krum, 50 steps")
    p.add_argument("--out", default="benchmarks/results/train_step.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.rules, args.steps = ["mean", "krum"], 50
    hw = {**hardware(), "command": command()}
    with open(args.out, "a") as out:
        for rule in args.rules:
            s = measure(
                rule,
                args.attack,
                args.workers,
                args.byzantine,
                args.steps,
                args.influence,
            )
            rec = {
                **hw,
                "rule": rule,
                "attack": args.attack,
                "n": args.workers,
                "f": args.byzantine,
                "steps": args.steps,
                "influence": args.influence,
                "steps_per_s": s["steps_per_s"],
                "compile_s": s["compile_s"],
                "test_accuracy": s["test_accuracy"],
            }
            emit(rec, out)
            print(
                f"{rule:18s} {s['steps_per_s']:7.1f} steps/s  compile "
                f"{s['compile_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )


if __name__ == "__main__":
    reexec_tuned()
    main()
