"""Early stopping in the training loop (``keep_best``, ``patience``): the kept weights are those of the best
validation evaluation, and a run without improvement stops after ``patience`` evaluations."""

from __future__ import annotations

import json

import pytest

import vitlab
from tests.train.tiny import make_folder, tiny_overrides
from vitlab.train import evaluate, load_config, train


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data")


def _val_records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "val"]


def test_keep_best_keeps_the_weights_of_the_best_evaluation(data, tmp_path):
    # 6 steps per epoch (48 images, batch 8): evaluations after epochs 1-4 and at the end (epoch 5).
    cfg = load_config(None, tiny_overrides(epochs=5, lr=0.003, randaugment_n=0, eval_every=1, keep_best=True))
    result = train(cfg, data, tmp_path / "run")
    records = _val_records(tmp_path / "run")
    assert [r["step"] for r in records] == [6, 12, 18, 24, 30]
    # The first evaluation with the highest top-1 (a later tie is not "better").
    top = max(r["top1"] for r in records)
    first_best = next(r for r in records if r["top1"] == top)
    saved = json.loads((tmp_path / "run" / "best.json").read_text())
    assert saved["step"] == first_best["step"] and saved["top1"] == top
    assert result["best"] == {"top1": top, "step": first_best["step"], "since": len(records) - 1 -
                              records.index(first_best)}
    best = vitlab.load(tmp_path / "run" / "best.safetensors")
    again = evaluate(best, data / "val", precision="fp32")
    assert again["top1"] == top and again["loss"] == pytest.approx(first_best["loss"], rel=1e-5)


def test_patience_stops_a_run_that_does_not_improve(data, tmp_path):
    # Label smoothing 1 makes the target uniform, which the zero-initialised head already predicts: every gradient
    # is zero, so every evaluation equals the first and none improves on it; patience 2 stops at the third (step 18).
    cfg = load_config(None, tiny_overrides(epochs=5, lr=0.003, label_smoothing=1.0, eval_every=1, patience=2))
    result = train(cfg, data, tmp_path / "run")
    assert result["step"] == 18 and result["stopped_early"]
    assert result["best"]["step"] == 6 and result["best"]["since"] == 2
    assert [r["step"] for r in _val_records(tmp_path / "run")] == [6, 12, 18]  # no second evaluation at the stop
    assert not (tmp_path / "run" / "best.safetensors").exists()  # keep_best is off
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_patience_must_be_positive():
    with pytest.raises(ValueError, match="patience must be a positive"):
        load_config(None, tiny_overrides(patience=0))
