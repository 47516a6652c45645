"""The README stays true: its tables list exactly the registries, its code runs."""

import pathlib
import re

import byzjax

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_names(marker: str) -> set[str]:
    """Backquoted names in the first column of the table after `marker`."""
    block = README.split(marker, 1)[1].split("\n\n", 1)[0]
    names = set()
    for line in block.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([a-z_0-9]+)`", first))
    return names


def test_rule_table_matches_registry():
    expected = set(byzjax.aggregators.names()) | set(byzjax.aggregators.pre_names())
    assert _table_names("<!-- rules-table") == expected


def test_attack_table_matches_registry():
    expected = set(byzjax.attacks.names()) | set(byzjax.attacks.poisoning_names())
    assert _table_names("<!-- attacks-table") == expected


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["u"].shape == (6, 1000)
