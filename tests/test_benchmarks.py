"""The benchmark scripts run, and docs/benchmarks.md is what their records make.

The scripts' numbers are never asserted (timings belong to the benchmarks, not to
tests): the scripts run on tiny shapes and write well-formed records, and the
report's verdicts follow the performance issue's rules on made-up records.
ByzFL's side (`compare_byzfl.py`) needs torch in a venv of its own and is not run.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from byzjax import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _report():
    spec = importlib.util.spec_from_file_location(
        "byzjax_bench_report", os.path.join(BENCH, "report.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, *args, tmp_path):
    """Runs benchmarks/`script` with `args` and --out in tmp_path; its records."""
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _floor_rule(name, fraction, n=100, dtype="float32"):
    return {
        "kind": "rule",
        "name": name,
        "n": n,
        "d": 1_000_000,
        "dtype": dtype,
        "seconds": 1.0,
        "floor_fraction": 0.1,  # the unalternated timing: not the one read
        "paired_floor_fraction": fraction,
    }


def _rows(lines, prefix):
    return [line for line in lines if line.startswith(prefix)]


def _byzfl(name, byzjax_s, byzfl_s, floor_s, n=100):
    return {
        "kind": "rule",
        "name": name,
        "n": n,
        "d": 1_000_000,
        "f": n // 4 - 1,
        "cpu": "Intel(R) Xeon(R) Processor",
        "cpu_isa": "family 6 model 167, AVX-512",
        "glibc_tunables": "glibc.malloc.hugetlb=1",
        "byzjax_s": byzjax_s,
        "byzfl_s": byzfl_s,
        "floor_s": floor_s,
        "ratio": byzfl_s / byzjax_s,
    }


def test_report_renders_the_committed_page():
    # docs/benchmarks.md is generated: a results file changed without
    # `python benchmarks/report.py` (or a hand edit of the page) fails here.
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        assert _report().render() == f.read()


def test_every_figure_the_page_shows_is_there():
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", f.read())
    report = _report()
    drawn = [cpu for cpu, rows in report.sections() if report.figured(*rows[:2])]
    assert drawn and images == [report.figure_file(cpu) for cpu in drawn]
    for image in images:
        assert os.path.getsize(os.path.join(ROOT, "docs", image)) > 10_000


def test_figure_draws_the_targets(tmp_path):
    pytest.importorskip("matplotlib")
    report = _report()
    path = tmp_path / "targets.png"
    report.figure(
        [_floor_rule("median", 1 / 1.3), _floor_rule("median", 1 / 1.8, n=25)],
        [_byzfl("median", 0.01, 1.0, 0.01), _byzfl("mean", 0.01, 0.03, 0.01)],
        str(path),
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_read_floor_verdicts_use_the_alternated_fraction():
    report = _report()
    lines = report.targets(
        [
            _floor_rule("median", 1 / 1.4),
            _floor_rule("trimmed_mean", 1 / 1.6),
            # Not an issue shape, and not a read-floor rule: no target row.
            {**_floor_rule("mean", 1.0), "d": 100_000},
            _floor_rule("krum", 1.0),
        ],
        [],
        [],
    )
    rows = _rows(lines, "| `")
    assert len(rows) == 2
    assert "| yes | 1.40x the floor (alternated) |" in rows[0]
    assert "| no | 1.60x the floor (alternated) |" in rows[1]


def test_byzfl_verdicts_yes_bound_no():
    report = _report()
    lines = report.targets(
        [],
        [
            _byzfl("median", 0.01, 1.0, 0.01),  # 100x: yes
            _byzfl("mean", 0.01, 0.03, 0.01),  # ByzFL at 3 reads: bound
            _byzfl("trimmed_mean", 0.2, 1.0, 0.01),  # 5x, ByzFL at 100 reads: no
        ],
        [],
    )
    rows = _rows(lines, "| `")
    assert [row.split(" | ")[2] for row in rows] == ["yes", "bound", "no"]
    assert "ByzFL takes 3.0 reads of the input, the rule needs 1" in rows[1]


def test_pairwise_rules_are_bound_by_their_multiply_adds():
    report = _report()
    record = _byzfl("krum", 0.1, 0.3, 0.01)
    # n(n - 1)/2 d products at the model's measured rate, in reads of the input.
    fma_s = 100 * 99 / 2 * 1e6 / 8 / report.FMA_PER_S[report.machine(record)]
    assert report.min_reads(record) == pytest.approx(fma_s / 0.01)
    # ByzFL at 0.3 s is more than 10x that floor: 3x is a miss, not bound.
    assert fma_s * 10 < 0.3
    (row,) = _rows(report.targets([], [record], []), "| `")
    assert " | no | 3.0x |" in row
    # At 10x the floor's time ByzFL would be bound.
    record = _byzfl("krum", 0.1, 9 * fma_s, 0.01)
    (row,) = _rows(report.targets([], [record], []), "| `")
    assert " | bound | " in row and "(its multiply-adds)" in row


def test_aggregators_script_writes_a_record_per_case(tmp_path):
    records = _run(
        "aggregators.py",
        *("--n", "7", "--d", "3000", "--dtype", "float32", "--repeats", "1"),
        *("--rules", "median", "krum", "clipping", "alie"),
        tmp_path=tmp_path,
    )
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {"read", "median", "krum", "clipping", "alie"}
    assert by_name["clipping"]["kind"] == "pre"
    assert by_name["alie"]["kind"] == "attack"
    for r in records:
        assert "error" not in r, r
        assert r["n"] == 7 and r["d"] == 3000 and r["dtype"] == "float32"
        assert r["seconds"] > 0 and r["cpu_count"] == os.cpu_count()
    floor = by_name["read"]["seconds"]
    for name in ("median", "krum", "clipping", "alie"):
        r = by_name[name]
        assert r["compile_s"] > 0
        assert r["floor_fraction"] == pytest.approx(floor / r["seconds"])
    # Only the rules with a read-floor target are timed alternated with it.
    assert "paired_floor_fraction" in by_name["median"]
    assert "paired_floor_fraction" not in by_name["krum"]


def test_device_path_runs_here_and_reports_the_device_targets(tmp_path):
    # The prepared GPU command's path (benchmarks/README.md), on the CPU: the
    # copy and Gram floors beside every rule, then every rule once on a given
    # input size. A device session has minutes; a break found there costs them.
    records = _run(
        "aggregators.py",
        *("--n", "100", "--d", "2000", "--dtype", "float32", "--repeats", "1"),
        *("--kinds", "rule", "pre", "--rules", "median", "krum", "nnm"),
        *("--device-floors", "--memory", "--memory-bytes", "2e6"),
        tmp_path=tmp_path,
    )
    floors = {r["name"]: r for r in records if r["kind"] == "floor"}
    assert set(floors) == {"read", "copy", "gram"}
    timed = {r["name"]: r for r in records if r["kind"] in ("rule", "pre")}
    memory = {r["name"]: r for r in records if r["kind"] == "memory"}
    assert set(timed) == set(memory) == {"median", "krum", "nnm"}
    for r in timed.values():
        assert "error" not in r, r
        assert r["copy_fraction"] == pytest.approx(
            floors["copy"]["seconds"] / (2 * r["seconds"])
        )
        assert r["gram_ratio"] == pytest.approx(
            r["seconds"] / floors["gram"]["seconds"]
        )
    for r in memory.values():
        assert r["ok"], r
        assert (r["n"], r["d"], r["input_bytes"]) == (100, 5000, 2_000_000)
    rows = _report().device_targets(records)
    targets = [row.split(" | ")[0] for row in rows]
    assert targets.count("| `median` at >= 60% of the copy bandwidth") == 1
    assert "| `krum` within 2x of the Gram matrix" in targets
    assert "| `nnm` within 2x of the Gram matrix" in targets
    assert sum("compiles in under 5 s" in t for t in targets) == 3
    assert sum("half the device's memory" in t for t in targets) == 3


def test_train_step_script_writes_steps_per_second(tmp_path):
    records = _run(
        "train_step.py",
        *("--rules", "median", "--workers", "5", "--byzantine", "1"),
        *("--steps", "4"),
        tmp_path=tmp_path,
    )
    (r,) = records
    assert (r["rule"], r["n"], r["f"], r["steps"]) == ("median", 5, 1, 4)
    assert r["steps_per_s"] > 0 and r["compile_s"] > 0
    assert 0 <= r["test_accuracy"] <= 1


@pytest.mark.skipif(not _native.enabled(), reason="no CPU kernels here")
def test_loop_forms_script_times_each_form(tmp_path):
    records = _run(
        "loop_forms.py",
        *("--n", "25", "--d", "4096", "--inputs", "gaussian", "--repeats", "1"),
        tmp_path=tmp_path,
    )
    assert records
    for r in records:
        assert r["kind"] == "loop_form" and r["n"] == 25 and r["input"] == "gaussian"
        assert r["on_s"] > 0 and r["off_s"] > 0 and r["floor_s"] > 0
        assert r["ratio"] == pytest.approx(r["on_s"] / r["off_s"])
