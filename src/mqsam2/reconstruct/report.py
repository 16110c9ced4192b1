"""Loss curves of a reconstruction phase, read back from its CSV logs (all attempts of a resumed run)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mqsam2.files import atomic_output


def read_metrics(logs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} with keys stripped of their unit/phase prefix; a later attempt's
    value wins where a resumed run logged the same step twice."""
    merged: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logs_dir).glob("attempt*/metrics.csv"), key=lambda p: int(p.parent.name[7:])):
        with open(path, newline="") as stream:
            for row in csv.DictReader(stream):
                step = int(row.pop("step"))
                for key, value in row.items():
                    if value not in ("", None):
                        merged.setdefault(key.rpartition("/")[2], {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in merged.items()}


def plot_loss_curve(metrics: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path | None:
    if not metrics.get("rec_loss"):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, values = zip(*metrics["rec_loss"], strict=True)
    ax.plot(steps, values, label="reconstruction loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    if metrics.get("reg"):
        twin = ax.twinx()
        steps, values = zip(*metrics["reg"], strict=True)
        twin.plot(steps, values, color="tab:orange", alpha=0.6, label="rounding regulariser")
        twin.set_ylabel("regulariser")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_output(path) as stream:
        fig.savefig(stream, dpi=100, format="png")
    plt.close(fig)
    return path
