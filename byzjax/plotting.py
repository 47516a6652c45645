"""Learning curves from run records (matplotlib, Agg backend, imported lazily).

matplotlib is an optional extra (`byzjax[plot]`); it is imported only when a figure
is drawn, so the library and the simulator work without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_grid"]

Records = Sequence[Mapping[str, Any]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: Records, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get(key) is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def plot_curves(runs: Mapping[str, Records], path: str | Path, title: str = "") -> Path:
    """Test accuracy and training loss over steps, one line per run.

    Args:
      runs: label -> the run's metric records (`records.read_metrics`).
      path: where to write the PNG.
      title: the figure title (the setting).

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, records in runs.items():
        ax_acc.plot(*_series(records, "test_accuracy"), marker=".", label=label)
        ax_loss.plot(*_series(records, "loss"), label=label)
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="step", ylabel="honest training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if len(runs) > 1 or any(runs):
        ax_acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grid(
    panels: Mapping[str, Mapping[str, Records]],
    path: str | Path,
    title: str = "",
    key: str = "test_accuracy",
) -> Path:
    """One panel per group (e.g. per attack), one line per run (e.g. per rule).

    Args:
      panels: panel title -> (label -> records).
      path: where to write the PNG.
      title: the figure title.
      key: the record field plotted (test accuracy by default).

    Returns:
      The path written.
    """
    plt = _pyplot()
    k = len(panels)
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3.6), sharey=True, squeeze=False)
    for ax, (name, runs) in zip(axes[0], panels.items(), strict=True):
        for label, records in runs.items():
            ax.plot(*_series(records, key), marker=".", label=label)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if key == "test_accuracy":
            ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(key.replace("_", " "))
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
