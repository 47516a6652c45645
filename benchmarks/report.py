"""Renders docs/benchmarks.md from the JSON lines in benchmarks/results/.

  python benchmarks/report.py                 # writes docs/benchmarks.md
  python benchmarks/report.py --out -         # prints it

Beside the page it draws each machine's targets (`figure`, matplotlib: the `bench`
extra), one PNG per machine that the page shows above its targets table.

The results files are appended to by every run; the report keeps the latest line of
each (kind, name, n, d, dtype) per CPU model, and renders one section per CPU (the
most recently measured first) with the commands and hardware of those lines: the
project's machines have changed CPU, and a ratio is only read against the floor and
the ByzFL run of the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Rules whose target is the read floor (within 1.5x): one pass over the input.
FLOOR_RULES = ("mean", "median", "trimmed_mean", "mean_around_median", "sign_majority")
# The (n, d) the performance issue names for that target; the grid's other shapes
# (d = 1e5, in cache) are in the tables.
FLOOR_SHAPES = ((25, 1_000_000), (100, 1_000_000))

# Passes over the input a rule cannot do without, where more than one: centered
# clipping (one iteration) needs every row's distance to the centre before its
# weight, then the weighted sum; ByzFL's geometric-median preset needs the rows'
# norms before the first step's weights, then each of its 3 steps one pass (its
# sum, with the next step's distances).
MIN_READS = {"centered_clipping": 2, "geometric_median": 4}

# Rules that need every pairwise distance: their floor is also `FMA_PER_S`'s.
PAIRWISE_RULES = ("krum", "multi_krum", "nnm")

# The issue's accelerator targets (benchmarks/aggregators.py's device floors): the
# coordinate-wise rules (`FLOOR_RULES`) at 60 % of the copy's bandwidth up to
# `COPY_MAX_N` rows; these rules (NNM a pre-aggregator) within 2x of the Gram
# matrix; every rule compiled in under `COMPILE_MAX_S` at n = 100.
COPY_TARGET, COPY_MAX_N = 0.6, 128
GRAM_RULES, GRAM_TARGET = ("krum", "multi_krum", "bulyan", "nnm"), 2.0
COMPILE_MAX_S = 5.0

# Multiply-adds per second on both cores of each benchmark machine, in 8-lane
# (AVX2) units: the fastest vector form the CPU has, measured by a C loop of
# independent FMAs (docs/performance.md; AVX-512 counts as two 8-lane ones). The
# rules that need every pairwise distance (Krum, Multi-Krum, NNM) cannot take less
# than the n(n - 1)/2 d multiply-adds of the Gram matrix's upper triangle (the
# performance issue's floor for the distance rules), nor less than one read. The
# geometric median can also take its steps from the pairwise distances
# (|x_i - z|^2 = (D w)_i - w'Dw / 2 for z = sum_j w_j x_j, sum w = 1): those
# multiply-adds, then one read for the last sum.
FMA_PER_S = {
    # Zen 3: 6.3-6.4e9 8-lane FMAs a second on each core, both at once (sessions
    # 8 and 22; an earlier loop's 9.1e9 understated it).
    "AMD EPYC (family 25 model 1, AVX2)": 1.28e10,
    # Zen 4: 7.3e9 8-lane FMAs a second on each core, both at once (one 16-lane
    # one a cycle, or two 8-lane ones; session 23's VM; session 15's ran 6.4e9).
    "AMD EPYC (family 25 model 17, AVX-512)": 1.46e10,
    "Intel(R) Xeon(R) Processor (family 6 model 207, AVX-512)": 2.05e10,
    # Session 30: 6.3-6.8e9 16-lane FMAs a second on each core, both at once
    # (session 17's VM ran 4.1-4.3e9).
    "Intel(R) Xeon(R) Processor (family 6 model 167, AVX-512)": 2.6e10,
}

# The vector units of the records made before `cpu_isa` was recorded: until then
# the project's only machine of each model name was this one.
_ISA_BEFORE_RECORDED = {
    "AMD EPYC": "family 25 model 1, AVX2",
    "Intel(R) Xeon(R) Processor": "family 6 model 207, AVX-512",
}


def machine(r: dict) -> str:
    """The machine a record ran on: its CPU model name, family, model and widest
    vector unit (one model name covers several of the project's machines)."""
    if r.get("platform") not in (None, "cpu"):  # an accelerator: its own name
        return f"{r.get('device', '?')} ({r['platform']})"
    cpu = r.get("cpu", "?")
    isa = r.get("cpu_isa") or _ISA_BEFORE_RECORDED.get(cpu)
    return f"{cpu} ({isa})" if isa else cpu


def min_reads(r: dict) -> float:
    """Reads of the input, or their equivalent in multiply-adds, the rule needs."""
    reads = MIN_READS.get(r["name"], 1)
    rate = FMA_PER_S.get(machine(r))
    pairwise = r["name"] in (*PAIRWISE_RULES, "geometric_median")
    if pairwise and r.get("floor_s") and rate:
        fma_s = r["n"] * (r["n"] - 1) / 2 * r["d"] / 8 / rate
        fma_reads = max(1.0, fma_s / r["floor_s"])
        if r["name"] == "geometric_median":
            return min(reads, fma_reads + 1)
        return max(reads, fma_reads)
    return reads


# Files whose latest line is kept per malloc setting too: the ByzFL comparison is
# reported under both (ByzFL's speed depends on it more than byzjax's).
BY_MALLOC = ("byzfl.jsonl", "train_step.jsonl")


def load(name: str, results: str = os.path.join(HERE, "results")) -> list[dict]:
    """The latest line per measurement key of results/<name>."""
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return []
    latest: dict = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            key = (machine(r), r.get("forms", "kernels")) + tuple(
                r.get(k)
                for k in ("kind", "name", "rule", "n", "d", "dtype", "attack", "input")
            )
            if name in BY_MALLOC:
                key += (_malloc(r),)
            latest.pop(key, None)  # keep file order of the latest lines
            latest[key] = r
    return list(latest.values())


def _malloc(r) -> str:
    """The malloc settings a record ran under: `tuned` (byzjax/_allocator.py) or
    `glibc default`; a ByzFL child inherits them."""
    return "tuned" if r.get("glibc_tunables") else "glibc default"


def _ms(s) -> str:
    return "—" if s is None else f"{s * 1e3:.1f}"


def _commands(rows) -> list[str]:
    seen = []
    for r in rows:
        c = r.get("command")
        if c and c not in seen:
            seen.append(c)
    return [f"    {c}" for c in seen] + [""] if seen else []


def _load_note(rows) -> str:
    loads = [r["load1"] for r in rows if "load1" in r]
    if not loads:
        return ""
    return f" 1-minute load average during the run: {min(loads):.1f}–{max(loads):.1f}."


def aggregator_tables(rows) -> list[str]:
    out = []
    shapes = sorted({(r["dtype"], r["n"], r["d"]) for r in rows})
    for dtype, n, d in shapes:
        sel = [r for r in rows if (r["dtype"], r["n"], r["d"]) == (dtype, n, d)]
        floors = {r["name"]: r for r in sel if r["kind"] == "floor"}
        head = f"#### n = {n}, d = {d:.0e}, {dtype}"
        if "read" in floors:
            read = floors["read"]
            head += f" (read floor {_ms(read['seconds'])} ms, {read['gbps']:.1f} GB/s"
            if "copy" in floors and "gram" in floors:
                head += (
                    f"; copy {_ms(floors['copy']['seconds'])} ms, "
                    f"{floors['copy']['gbps']:.0f} GB/s read and written; "
                    f"Gram matrix {_ms(floors['gram']['seconds'])} ms"
                )
            head += ")"
        device = any("copy_fraction" in r for r in sel)
        extra = " of copy rate | x Gram |" if device else ""
        out += [
            head,
            "",
            "| kind | name | f | ms | GB/s | of floor | compile s | temp MB |" + extra,
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if device else ""),
        ]
        for r in sel:
            if r["kind"] == "floor":
                continue
            if "error" in r:
                why = r.get("skipped") or f"error: {r['error'][:100]}"
                out.append(f"| {r['kind']} | `{r['name']}` | {r['f']} | {why} |||||")
                continue
            temp = "—" if r.get("temp") is None else f"{r['temp'] / 1e6:.0f}"
            cells = (
                f" {r['copy_fraction']:.2f} | {r['gram_ratio']:.2f} |"
                if device and "copy_fraction" in r
                else ""
            )
            out.append(
                f"| {r['kind']} | `{r['name']}` | {r['f']} | {_ms(r['seconds'])} | "
                f"{r['gbps']:.1f} | {r['floor_fraction']:.2f} | "
                f"{r['compile_s']:.2f} | {temp} |" + cells
            )
        out.append("")
    return out


def loop_form_table(rows) -> list[str]:
    out = [
        "| choice | rule | n | d | dtype | input | on ms | off ms | read ms "
        "| on / off | taken here |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | `{r['rule']}` | {r['n']} | {r['d']:.0e} | {r['dtype']} "
            f"| {r['input']} | {r['on_s'] * 1e3:.2f} | {r['off_s'] * 1e3:.2f} "
            f"| {r['floor_s'] * 1e3:.2f} | {r['ratio']:.2f} "
            f"| {'yes' if r['taken'] else 'no'} |"
        )
    return out + [""]


def vmap_table(rows) -> list[str]:
    out = [
        "| name | n | d | dtype | inputs | vmapped ms | one call each ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "vmap_ratio" not in r:
            continue
        out.append(
            f"| `{r['name']}` | {r['n']} | {r['d']:.0e} | {r['dtype']} | "
            f"{r['vmap_batch']} x (n, d / {r['vmap_batch']}) | "
            f"{_ms(r['vmapped_s'])} | {_ms(r['each_s'])} | {r['vmap_ratio']:.2f} |"
        )
    return out + [""]


def byzfl_table(rows) -> list[str]:
    out = [
        "| kind | name | n | d | malloc | read floor ms | byzjax ms | ByzFL ms "
        "| ByzFL / byzjax | ByzFL call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("kind") == "train":
            continue
        theirs = r.get("skipped") or _ms(r.get("byzfl_s"))
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else "—"
        out.append(
            f"| {r['kind']} | `{r['name']}` | {r['n']} | {r['d']:.0e} | {_malloc(r)} "
            f"| {_ms(r.get('floor_s'))} | {_ms(r.get('byzjax_s'))} | {theirs} "
            f"| {ratio} | `{r['byzfl']}` |"
        )
    return out + [""]


def train_table(rows, byzfl_rows) -> list[str]:
    versus = {
        (r["name"], _malloc(r)): r for r in byzfl_rows if r.get("kind") == "train"
    }
    out = [
        "| rule | steps/s | compile s | influence | test acc. | ByzFL-style loop "
        "steps/s (same run) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = versus.get((r["rule"], _malloc(r)))
        theirs = "—" if v is None else f"{v['byzfl_steps_per_s']:.1f}"
        ratio = (
            "—" if v is None else f"{r['steps_per_s'] / v['byzfl_steps_per_s']:.1f}x"
        )
        out.append(
            f"| `{r['rule']}` | {r['steps_per_s']:.1f} | {r['compile_s']:.2f} "
            f"| {r['influence']} | {r['test_accuracy']:.3f} | {theirs} | {ratio} |"
        )
    return out + [""]


def ablation_table(rows) -> list[str]:
    out = [
        "| choice | n | d | byzjax ms | plain ms | speed-up "
        "| byzjax form vs plain form |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['n']} | {r['d']:.0e} | {_ms(r['byzjax_s'])} "
            f"| {_ms(r['plain_s'])} | {r['ratio']:.1f}x | {r['what']} |"
        )
    return out + [""]


def floor_targets(agg) -> list[tuple[dict, float, bool]]:
    """The read-floor targets' records: (record, fraction of the floor (1 = at
    it), whether alternated with the floor)."""
    out = []
    for r in agg:
        if (
            r["kind"] == "rule"
            and r["name"] in FLOOR_RULES
            and (r["n"], r["d"]) in FLOOR_SHAPES
            and "seconds" in r
        ):
            # Alternated with the floor call by call where recorded (drift-proof).
            frac = r.get("paired_floor_fraction", r["floor_fraction"])
            out.append((r, frac, "paired_floor_fraction" in r))
    return out


def byzfl_verdict(r: dict) -> tuple[str, str]:
    """`yes`, `bound` or `no` for the 10x-faster-than-ByzFL target, and the
    bound's detail."""
    # Where ByzFL takes less than 10x the passes over the input that the rule
    # cannot do without (`min_reads`, one by default), 10x faster than ByzFL
    # would beat that many reads: the target is then bounded by the floor, and
    # the detail says how far from the floor byzjax is.
    if r["ratio"] >= 10:
        return "yes", ""
    floor = r.get("floor_s")
    reads = min_reads(r)
    if floor is not None and r["byzfl_s"] < 10 * reads * floor:
        fma = " (its multiply-adds)" if reads > MIN_READS.get(r["name"], 1) else ""
        return "bound", (
            f" (ByzFL takes {r['byzfl_s'] / floor:.1f} reads of the input, the "
            f"rule needs {reads:.3g}{fma}; byzjax {r['byzjax_s'] / floor:.1f})"
        )
    return "no", ""


def byzfl_targets(byzfl) -> list[dict]:
    """The records of the 10x-faster-than-ByzFL target (not the training loops)."""
    return [r for r in byzfl if r.get("kind") != "train" and "ratio" in r]


def targets(agg, byzfl, train) -> list[str]:
    """Which of the issue's targets hold in these numbers."""
    out = ["| target | shape | holds | detail |", "|---|---|---|---|"]
    for r, frac, alternated in floor_targets(agg):
        out.append(
            f"| `{r['name']}` within 1.5x of the read floor | "
            f"({r['n']}, {r['d']:.0e}) {r['dtype']} | "
            f"{'yes' if frac >= 1 / 1.5 else 'no'} | "
            f"{1 / frac:.2f}x the floor{' (alternated)' if alternated else ''} |"
        )
    out += device_targets(agg)
    for r in byzfl_targets(byzfl):
        verdict, note = byzfl_verdict(r)
        out.append(
            f"| `{r['name']}` >= 10x faster than ByzFL | ({r['n']}, {r['d']:.0e}), "
            f"malloc {_malloc(r)} | {verdict} | {r['ratio']:.1f}x{note} |"
        )
    for r in byzfl:
        if r.get("kind") == "train":
            ok = r["ratio"] >= 5
            out.append(
                f"| training step `{r['name']}` >= 5x ByzFL-style loop | 25 workers, "
                f"malloc {_malloc(r)} "
                f"| {'yes' if ok else 'no'} | {r['byzjax_steps_per_s']:.1f} vs "
                f"{r['byzfl_steps_per_s']:.1f} steps/s = {r['ratio']:.1f}x |"
            )
    return out + [""]


def device_targets(agg) -> list[str]:
    """The accelerator targets' rows (records with the device floors, and the
    memory check's)."""
    out = []
    for r in agg:
        if "copy_fraction" not in r:
            continue
        where = f"({r['n']}, {r['d']:.0e}) {r['dtype']}"
        if r["kind"] == "rule" and r["name"] in FLOOR_RULES and r["n"] <= COPY_MAX_N:
            ok = r["copy_fraction"] >= COPY_TARGET
            out.append(
                f"| `{r['name']}` at >= {COPY_TARGET:.0%} of the copy bandwidth | "
                f"{where} | {'yes' if ok else 'no'} | {r['copy_fraction']:.0%} |"
            )
        if r["name"] in GRAM_RULES:
            ok = r["gram_ratio"] <= GRAM_TARGET
            out.append(
                f"| `{r['name']}` within {GRAM_TARGET:g}x of the Gram matrix | "
                f"{where} | {'yes' if ok else 'no'} | {r['gram_ratio']:.2f}x |"
            )
        if r["n"] == 100:
            ok = r["compile_s"] < COMPILE_MAX_S
            out.append(
                f"| `{r['name']}` compiles in under {COMPILE_MAX_S:g} s | {where} | "
                f"{'yes' if ok else 'no'} | {r['compile_s']:.1f} s |"
            )
    for r in agg:
        if r["kind"] == "memory":
            gib = r["input_bytes"] / 2**30
            detail = "ran" if r["ok"] else r["error"][:120]
            out.append(
                f"| `{r['name']}` runs on an input of half the device's memory | "
                f"(100, {r['d']:.2e}) {r['dtype']}, {gib:.1f} GiB | "
                f"{'yes' if r['ok'] else 'no'} | {detail} |"
            )
    return out


def _machines(*files) -> list[str]:
    """The machines of the records, the most recently measured first."""
    last: dict = {}
    for rows in files:
        for r in rows:
            cpu = machine(r)
            last[cpu] = max(last.get(cpu, 0.0), r.get("time", 0.0))
    return sorted(last, key=last.get, reverse=True)


def sections() -> list[tuple[str, list[list[dict]]]]:
    """Each machine, the most recently measured first, with its records of each
    results file (aggregators, byzfl, train_step, ablations, vmapped, loop_forms:
    `render_machine`'s arguments)."""
    files = [
        load(n)
        for n in (
            "aggregators.jsonl",
            "byzfl.jsonl",
            "train_step.jsonl",
            "ablations.jsonl",
            "vmapped.jsonl",
            "loop_forms.jsonl",
        )
    ]
    return [
        (cpu, [[r for r in rows if machine(r) == cpu] for rows in files])
        for cpu in _machines(*files)
    ]


def render() -> str:
    machines = sections()
    lines = [
        "<!-- generated by benchmarks/report.py from benchmarks/results/ -->",
        "# Benchmarks",
        "",
        "One section per machine the benchmarks ran on, the most recent first: "
        "every ratio is read against the floor and the ByzFL run of its own "
        "machine. Machines: "
        + ", ".join(f"[{cpu}](#{_anchor(cpu)})" for cpu, _ in machines)
        + ".",
        "",
        "Method (benchmarks/_common.py): inputs are arguments of the jitted function "
        "(never closed over), compile time is measured apart "
        "(`jax.jit(fn).lower(x).compile()`), then one warm-up call and the median of "
        "5 warm calls (at least 3 for calls over 0.6 s), each ended by "
        "`block_until_ready`. The read floor is the fastest of `ones @ x` "
        "(HIGHEST precision) and two row-by-row sums, measured in the same run on "
        "the same array. `of floor` = floor seconds / seconds (1.0 = one read of the "
        "input); GB/s = n·d·itemsize / seconds; `temp MB` = XLA's temporary buffers "
        "(`compiled.memory_analysis()`).",
        "",
    ]
    for _, rows in machines:
        lines += render_machine(*rows)
    return "\n".join(lines)


def figure_file(cpu: str) -> str:
    """The file of a machine's targets figure, beside benchmarks.md."""
    return f"benchmarks-{_anchor(cpu)}.png"


def figured(agg, byzfl) -> tuple[list[dict], list[dict]] | None:
    """The records of a machine's figure (its kernels' aggregator records and its
    ByzFL records); None where it has no targets to draw."""
    agg = [r for r in agg if not _xla_on_cpu(r)]
    return (agg, byzfl) if floor_targets(agg) or byzfl_targets(byzfl) else None


def figure(agg, byzfl, path: str) -> None:
    """A machine's targets as bars: each read-floor rule's time over the floor
    (the 1.5x target dashed), and ByzFL's time over byzjax's, tuned malloc, on a
    log scale (the 10x target dashed; `bound` targets hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [2, 5]}
    )
    floor = floor_targets(agg)
    # float32 first, then by n.
    cases = sorted(
        {(r["dtype"], r["n"]) for r, _, _ in floor},
        key=lambda c: (c[0] != "float32", c[1]),
    )
    _bars(
        left,
        FLOOR_RULES,
        cases,
        {(r["dtype"], r["n"], r["name"]): (1 / frac, "") for r, frac, _ in floor},
        lambda case: f"{case[0]}, n = {case[1]}",
    )
    left.axhline(1.0, color="grey", lw=0.8)
    left.axhline(1.5, color="k", ls="--", lw=1, label="target: 1.5x")
    left.set_ylabel("time / read floor, d = 1e6")
    left.legend(fontsize=7)
    versus = [r for r in byzfl_targets(byzfl) if _malloc(r) == "tuned"]
    names = list(dict.fromkeys(r["name"] for r in versus))
    ns = sorted({(r["n"],) for r in versus})
    _bars(
        right,
        names,
        ns,
        {(r["n"], r["name"]): (r["ratio"], byzfl_verdict(r)[0]) for r in versus},
        lambda case: f"n = {case[0]}, d = 1e6",
    )
    right.set_yscale("log")
    right.axhline(10, color="k", ls="--", lw=1, label="target: 10x")
    right.set_ylabel("ByzFL time / byzjax time (tuned malloc)")
    handles, labels = right.get_legend_handles_labels()
    bound = Patch(facecolor="white", edgecolor="k", hatch="//")
    right.legend(
        [*handles, bound], [*labels, "bound: 10x would beat the floor"], fontsize=7
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _bars(ax, names, cases, values, label) -> None:
    """Grouped bars: one group per name, one bar per case; `values[(*case, name)]`
    is (height, verdict), a `bound` verdict hatched."""
    width = 0.8 / max(len(cases), 1)
    for i, case in enumerate(cases):
        offset = (i - (len(cases) - 1) / 2) * width
        shown = [name for name in names if (*case, name) in values]
        for name in shown:
            height, verdict = values[(*case, name)]
            ax.bar(
                names.index(name) + offset,
                height,
                width,
                color=f"C{i}",
                hatch="//" if verdict == "bound" else None,
                edgecolor="k" if verdict == "bound" else None,
                label=label(case) if name == shown[0] else None,
            )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to -."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _xla_on_cpu(r: dict) -> bool:
    """A CPU record of the pure-XLA forms (`BYZJAX_NATIVE=0`), kept apart from the
    kernels' records and targets."""
    return r.get("forms") == "xla" and r.get("platform") == "cpu"


def render_machine(agg, byzfl, train, ablations, vmapped, loop_forms) -> list[str]:
    """The section of one machine: its hardware, targets and tables."""
    xla = [r for r in agg if _xla_on_cpu(r)]
    agg = [r for r in agg if not _xla_on_cpu(r)]
    any_row = (agg or byzfl or train or [{}])[0]
    hw = (
        f"{machine(any_row)}, {any_row.get('cpu_count', '?')} cores, "
        f"{any_row.get('platform', '?')} ({any_row.get('device', '?')}), "
        f"jax {any_row.get('jax', '?')}, jaxlib {any_row.get('jaxlib', '?')}"
    )
    lines = [
        f"## {machine(any_row)}",
        "",
        f"Hardware: {hw}.{_load_note(agg + byzfl + train)}",
        "",
        "### Targets",
        "",
        "Which targets of the performance issue hold, and why the others do not: "
        "[performance.md](performance.md). The read-floor targets are the "
        "issue's shapes, (25, 1e6) and (100, 1e6); the grid's d = 1e5 (in cache) "
        "is in the tables below. `bound`: ByzFL takes fewer than 10 times "
        "the reads of the input the rule needs (one; two for centered clipping, "
        "four for the geometric median's three steps, or two where the "
        "multiply-adds of its pairwise route take less than a read), or their "
        "time in multiply-adds where the rule cannot do with fewer (Krum, "
        "Multi-Krum and NNM: the n(n - 1)/2 d of the pairwise distances at this "
        "machine's measured FMA rate, `FMA_PER_S` in benchmarks/report.py), so "
        "10x faster than ByzFL would be faster than reading the input that often, "
        "or than the CPU's multiply-adds. `malloc`: the glibc "
        "settings both libraries ran under (a ByzFL child inherits them): `tuned` "
        "is what the byzjax command and benchmark scripts restart with "
        "(byzjax/_allocator.py), "
        "`glibc default` the plain environment. On an accelerator: the "
        "coordinate-wise rules' read rate against the copy's (`x + 1`, its bytes "
        "read and written), the distance rules' time against the Gram matrix at "
        "full float32 precision, compile seconds at n = 100, and every rule on an "
        "input of half the device's memory (`aggregators.py --memory`).",
        "",
    ]
    if figured(agg, byzfl):
        lines += [
            f"![The targets on {machine(any_row)}]({figure_file(machine(any_row))})",
            "",
            "Left: the read-floor rules' time over the floor at d = 1e6 (the "
            "table's figures). Right: ByzFL's time over byzjax's under the tuned "
            "malloc, log scale; hatched where the target is `bound`, no bar where "
            "ByzFL has no time (the table below says why).",
            "",
        ]
    lines += targets(agg, byzfl, train)
    lines += [
        "### Aggregators, pre-aggregators (before `mean`) and attacks",
        "",
        "Commands:",
        "",
    ]
    lines += _commands(agg)
    lines += aggregator_tables([r for r in agg if r["kind"] != "memory"])
    if xla:
        lines += [
            "### The XLA forms on this CPU (`BYZJAX_NATIVE=0`)",
            "",
            "The forms every accelerator compiles, and a CPU without a C++ "
            "compiler runs: no CPU kernels, no generated loops. Not the "
            "library's speed on this CPU (above); their temporaries, and "
            "XLA:CPU's compile seconds for the programs a GPU's compiler is "
            "given too (a GPU's own compile time is not measured here). "
            "Commands:",
            "",
        ]
        lines += _commands(xla)
        lines += aggregator_tables([r for r in xla if r["kind"] != "memory"])
    lines += [
        "### Rules under `jax.vmap` (sweeps)",
        "",
        "Each rule vmapped over B inputs of (n, d / B) against the same inputs "
        "aggregated one call after the other (`--vmap B`): a ratio near 1 means a "
        "sweep costs no more than its inputs (a `lax.cond` under vmap runs both "
        "sides; the rules' fallbacks are one-trip loops instead). Commands:",
        "",
    ]
    lines += _commands(vmapped)
    lines += vmap_table(vmapped)
    lines += [
        "### Against ByzFL 0.0.11 (PyTorch 2.13 CPU), same run",
        "",
        "ByzFL runs in its own venv (`.byzfl-venv`) in a child process of the same "
        "invocation; median of the warm calls on float32 torch tensors of the same "
        "shape. Since session 23 one byzjax call, one ByzFL call and one read of "
        "the input alternate, round by round (`--repeats` rounds), so that the "
        "machine's drift slows all three alike; before, each library's calls ran "
        "in a batch of their own. Commands:",
        "",
    ]
    lines += _commands(byzfl)
    lines += byzfl_table(byzfl)
    lines += [
        "### Training step (25 workers, 5 ALIE, MLP 784-100-10, batch 50, mnist5k)",
        "",
        "Steps/s of the compiled scanned chunk, warm (compile apart). The ByzFL-style "
        "column is the torch loop of compare_byzfl.py in the same conditions. "
        "Commands:",
        "",
    ]
    lines += _commands(train)
    lines += train_table(train, byzfl)
    lines += [
        "### Design choices against the plain JAX form (same run, alternated)",
        "",
        "Why the numerics are written as they are; see docs/performance.md. Commands:",
        "",
    ]
    lines += _commands(ablations)
    lines += ablation_table(ablations)
    if loop_forms:
        lines += [
            "### The loops' CPU-dependent forms (same run, alternated)",
            "",
            "Each coordinate-wise rule's generated loop with a form on and off "
            "(the same bits), alternated call by call with a float32 read of the "
            "input's bytes (`read ms`): `column pairs`, bfloat16 rows two columns "
            "to a 32-bit lane on 16-bit order keys (`networks.pair_loops`); `order "
            "keys`, float32 networks on integer keys (`networks.keyed_exchanges`). "
            "`taken here`: the form this CPU runs. The mean around the median's "
            "loop is its window (k = n - f, 2k >= n) in the lines from session 29 "
            "on, its general form before. Inputs: Gaussian rows; half the "
            "columns +0 (`zeros`); those with a -0 in every 64th column (`signed "
            "zeros`, where a step whose result is a zero is redone by float "
            "exchanges). Commands:",
            "",
        ]
        lines += _commands(loop_forms)
        lines += loop_form_table(loop_forms)
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    text = render()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
        for cpu, (agg, byzfl, *_) in sections():
            if drawn := figured(agg, byzfl):
                path = os.path.join(os.path.dirname(args.out), figure_file(cpu))
                figure(*drawn, path)
                print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
