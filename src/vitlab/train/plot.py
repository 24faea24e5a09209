"""Training curves from a run's ``metrics.jsonl``: loss, validation accuracy and learning rate, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from vitlab.io import atomic_write


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a vitlab train run directory?)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/curves.png`` (or ``out``): training loss, validation top-1/top-5 and the learning rate
    against the epoch. Returns the written path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["epoch"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    if val:
        ax.plot([r["epoch"] for r in val], [r["top1"] for r in val], "o-", label="val top-1")
        ax.plot([r["epoch"] for r in val], [r["top5"] for r in val], "s--", label="val top-5")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_title("accuracy")
    ax = axes[2]
    ax.plot([r["epoch"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("epoch")
    ax.set_title("learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
