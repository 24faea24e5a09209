"""``scripts/run_stats.py``, which reproduces the per-phase training rates quoted in README and docs/train.md, on a
hand-made run folder whose rates and epochs are worked out by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vitlab.train.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _run_stats():
    spec = importlib.util.spec_from_file_location("run_stats", REPO / "scripts" / "run_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phase_rates_by_hand(tmp_path, capsys) -> None:
    """Logs every 10 s over 100 s, batch 10, 10 steps an epoch. Phases end at 25% and 80% of the time: intervals
    starting at 0-20 s (3 x 20 steps), 30-70 s (5 x 10 steps), 80-90 s (2 x 5 steps). Rates: 600 images / 30 s =
    20 img/s, 500 / 50 = 10, 100 / 20 = 5; epochs 6.0, 5.0, 1.0."""
    cfg = load_config("small-scratch", ["batch_size=10"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "final.json").write_text(json.dumps({"top1": 50.0, "epochs": 12.0, "train_img_per_s": 12.0}))
    step, lines = 0, []
    for i in range(11):
        lines.append({"step": step, "epoch": step / 10, "loss": 1.0, "time": 1000.0 + 10 * i})
        step += 20 if i < 3 else 10 if i < 8 else 5
    lines.insert(5, {"step": 80, "epoch": 8.0, "split": "val", "top1": 40.0})  # evaluations are skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    _run_stats().main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "16 px: 20 img/s, 6.0 epochs" in out
    assert "24 px: 10 img/s, 5.0 epochs" in out
    assert "32 px: 5 img/s, 1.0 epochs" in out
    assert "1 runs: mean 50.00" in out
