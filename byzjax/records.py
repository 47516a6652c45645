"""What a run leaves on disk: metrics.jsonl, summary.json, config.toml.

One JSON object per logged step in ``metrics.jsonl`` (the window means of the
per-step diagnostics since the previous record, plus the test metrics where an
evaluation happened), one ``summary.json`` at the end, and the resolved
configuration as ``config.toml``, which `byzjax run out/config.toml` reads back.
Non-finite floats are written as ``null`` so every file is strict JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunWriter", "clean", "read_metrics", "read_summary"]


def clean(value: Any) -> Any:
    """Makes `value` strict-JSON friendly: NaN/Inf -> None, numpy scalars -> Python."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunWriter:
    """Writes one run's records into a directory (created if missing).

    Args:
      out: the output directory.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")

    def write_config(self, toml_text: str) -> Path:
        """Writes the resolved configuration as config.toml."""
        path = self.out / "config.toml"
        path.write_text(toml_text)
        return path

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Appends records to metrics.jsonl, one JSON object a line."""
        with self.metrics_path.open("a") as fh:
            for record in records:
                fh.write(json.dumps(clean(record), allow_nan=False) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Writes summary.json."""
        path = self.out / "summary.json"
        path.write_text(json.dumps(clean(summary), indent=2, allow_nan=False) + "\n")
        return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl (a file or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_summary(path: str | Path) -> dict[str, Any]:
    """Reads summary.json (a file or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    return json.loads(path.read_text())
