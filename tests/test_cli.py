"""The command line: `byzjax run`, `byzjax list`, `byzjax demo`, override parsing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from byzjax import cli, records
from byzjax.sim import config as config_lib

TINY = [
    "dataset=synthetic",
    "model=logreg",
    "workers=6",
    "byzantine=1",
    "batch_size=8",
    "steps=20",
    "eval_every=10",
    "log_every=5",
]


def test_parse_value_reads_toml_literals_and_bare_words():
    pv = config_lib.parse_value
    assert pv("3") == 3 and isinstance(pv("3"), int)
    assert pv("0.1") == 0.1
    assert pv("1e-3") == 1e-3
    assert pv("true") is True
    assert pv("krum") == "krum"
    assert pv("runs/foe") == "runs/foe"
    assert pv('"quoted"') == "quoted"
    assert pv("[nnm, bucketing]") == ["nnm", "bucketing"]
    assert pv('["nnm"]') == ["nnm"]
    assert pv("[]") == []
    assert pv("none") is None


def test_overrides_fill_fields_and_params():
    cfg = config_lib.apply_overrides(
        config_lib.Config(),
        [
            "dataset=mnist5k",
            "workers=25",
            "byzantine=11",
            "aggregator=krum",
            "attack=ipm",
            "attack.eps=0.1",
            "steps=300",
            "seed=1",
            "out=runs/foe",
            "lr=1",
            "pre=bucketing",
            "pre.bucketing.s=2",
            "aggregator.neighbors=3",
        ],
    )
    assert (cfg.workers, cfg.byzantine, cfg.steps, cfg.seed) == (25, 11, 300, 1)
    assert cfg.attack == "ipm" and cfg.attack_params == {"eps": 0.1}
    assert cfg.aggregator_params == {"neighbors": 3}
    assert cfg.pre == ["bucketing"] and cfg.pre_params == {"bucketing": {"s": 2}}
    assert cfg.out == "runs/foe" and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    # TOML reads nan and inf as floats; as names they are the crash-fault attacks
    for name in ("nan", "inf"):
        cfg = config_lib.apply_overrides(config_lib.Config(), [f"attack={name}"])
        assert cfg.attack == name
    cfg = config_lib.apply_overrides(config_lib.Config(), ["attack.z=inf"])
    assert cfg.attack_params["z"] == float("inf")


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("steps=ten", "steps"),
        ("steps=1.5", "steps"),
        ("nope=1", "nope"),
        ("placement=sideways", "placement"),
        ("influence=3", "influence"),
        ("lr=abc", "lr"),
        ("novalue", "novalue"),
    ],
)
def test_bad_overrides_name_the_field(item, field):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.apply_overrides(config_lib.Config(), [item])
    assert info.value.field == field


def test_toml_round_trip(tmp_path):
    cfg = config_lib.apply_overrides(
        config_lib.Config(),
        ["aggregator=krum", "attack=alie", "attack.z=1.5", "pre=[nnm]", "tolerate=3"],
    )
    path = tmp_path / "c.toml"
    path.write_text(config_lib.to_toml(cfg))
    assert config_lib.load(path) == cfg
    # the table form of a rule is accepted too
    path.write_text('[aggregator]\nname = "multi_krum"\nm = 4\n')
    loaded = config_lib.load(path)
    assert loaded.aggregator == "multi_krum" and loaded.aggregator_params == {"m": 4}


def test_run_end_to_end_writes_all_files(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        ["run", *TINY, "aggregator=median", "attack=alie", f"out={out}", "--quiet"]
    )
    assert rc == 0
    assert "test accuracy" in capsys.readouterr().out
    for name in ("metrics.jsonl", "summary.json", "config.toml", "curves.png"):
        assert (out / name).is_file(), name
    summary = records.read_summary(out)
    for key in ("test_accuracy", "loss", "steps_per_s", "compile_s", "traces"):
        assert key in summary
    assert summary["traces"] == 1
    recs = records.read_metrics(out)
    assert [r["step"] for r in recs] == [0, 5, 10, 15, 20]
    assert "ip" in recs[1] and "test_accuracy" in recs[2]
    # every line is strict JSON
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    # the resolved config runs again as a config file, with overrides on top
    out2 = tmp_path / "again"
    rc = cli.main(
        ["run", str(out / "config.toml"), "steps=10", f"out={out2}", "--quiet"]
    )
    assert rc == 0
    assert records.read_summary(out2)["config"]["aggregator"] == "median"


@pytest.mark.parametrize(
    ("items", "field"),
    [
        (["aggregator=krum", "byzantine=2"], "byzantine"),  # n=6 < 2f + 3
        (["aggregator=krumm"], "aggregator"),
        (["attack=ipmm"], "attack"),
        (["batch_size=5000"], "batch_size"),
        (["dataset=cifar10"], "data_dir"),
        (["dataset=mnist", "data_dir=/definitely/missing"], "data_dir"),
        (["steps=0"], "steps"),
    ],
)
def test_bad_config_is_one_line_exit_2(items, field, capsys):
    rc = cli.main(["run", *TINY, *items, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"byzjax run: error: {field}:")


def test_missing_config_file(capsys):
    assert cli.main(["run", "no_such.toml"]) == 2
    assert "config:" in capsys.readouterr().err


def test_list_prints_registries(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "krum",
        "median",
        "nnm",
        "alie",
        "ipm",
        "label_flip",
        "mnist5k",
        "mlp",
    ):
        assert word in out


def test_run_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in config_lib.FIELDS:
        assert f"  {name} [" in text, name


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "byzjax", "list"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "krum" in proc.stdout


def test_demo_tiny(tmp_path, monkeypatch):
    # Two of its rules: the demo's code is the same for each, and each rule's
    # program is a compilation of its own (about 5 s here).
    monkeypatch.setattr(cli, "DEMO_RULES", ("mean", "krum"))
    out = tmp_path / "demo"
    result = cli.demo([*TINY, "workers=7", f"out={out}"], progress=False)
    assert set(result["accuracy"]) == set(cli.DEMO_RULES)
    assert all(len(v) == 3 for v in result["accuracy"].values())
    assert (out / "curves.png").is_file() and (out / "table.md").is_file()
    assert (out / "results.json").is_file()
    assert (out / "krum-ipm" / "metrics.jsonl").is_file()
