"""The resolution study on tiny settings: its cells, the compute each is given, the position table kept without
interpolation, refusals and resume."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
import vitlab.train
from tests.study.conftest import TINY_RECIPE, TINY_VIT
from vitlab.study import runner
from vitlab.study.resolution import TRAINING_FLOPS_PER_FORWARD, not_interpolated_checkpoint, place_pos_embed, \
    resolution


def test_place_pos_embed_by_hand() -> None:
    # A class slot and a 2x2 grid (values 1..4 in row-major order) placed on a 3x3 grid.
    table = torch.tensor([[[9.0, 9.0], [1, 1], [2, 2], [3, 3], [4, 4]]])  # 1, 1 + 4, D=2
    out = place_pos_embed(table, (3, 3), (2, 2), num_prefix_tokens=1)
    expected = torch.tensor([[[9.0, 9.0], [1, 1], [2, 2], [0, 0], [3, 3], [4, 4], [0, 0], [0, 0], [0, 0], [0, 0]]])
    assert torch.equal(out, expected)
    assert torch.equal(place_pos_embed(table[:, 1:], (2, 2), (2, 2)), table[:, 1:])  # same grid: unchanged
    with pytest.raises(ValueError, match="smaller than the old one"):
        place_pos_embed(table, (1, 3), (2, 2), num_prefix_tokens=1)


def test_not_interpolated_checkpoint_keeps_every_other_weight(tmp_path) -> None:
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=16, depth=1,
                                num_heads=2, mlp_dim=32)
    vitlab.save(model, tmp_path / "pre.safetensors")
    not_interpolated_checkpoint(tmp_path / "pre.safetensors", 24, tmp_path / "kept.safetensors")
    kept = vitlab.load(tmp_path / "kept.safetensors")
    assert kept.config.image_size == 24 and kept.config.grid_size == (6, 6)
    grid = kept.pos_embed[0, 1:].reshape(6, 6, 16)
    assert torch.equal(kept.pos_embed[0, 0], model.pos_embed[0, 0])  # the class slot
    assert torch.equal(grid[:4, :4], model.pos_embed[0, 1:].reshape(4, 4, 16))
    assert torch.count_nonzero(grid[4:]) == 0 and torch.count_nonzero(grid[:, 4:]) == 0
    for k, v in model.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(kept.state_dict()[k], v), k


def test_resolution_study_cells_compute_and_resume(tiny_data, tmp_path, monkeypatch) -> None:
    from vitlab.bench.flops import count_flops
    from vitlab.model import config_from_name

    out = tmp_path / "res"
    kwargs = dict(model=TINY_VIT, sizes=[24, 16], pretrain_steps=12, finetune_steps=4, sets=TINY_RECIPE,
                  progress=False)
    summary = resolution(tiny_data, out, **kwargs)
    cells = {c["key"]: c for c in summary["cells"]}
    assert list(cells) == ["pretrain_16px", "finetune_16px_interpolated", "finetune_24px_interpolated",
                           "finetune_24px_not-interpolated", "scratch_24px"]
    gflops = {s: count_flops(config_from_name("ViT-Ti/16", num_classes=3, image_size=s, patch_size=4, width=16,
                                              depth=1, num_heads=2, mlp_dim=32)) / 1e9 for s in (16, 24)}
    scratch = round((12 * gflops[16] + 4 * gflops[24]) / gflops[24])  # the same compute as pre-train + fine-tune
    assert [c["steps"] for c in cells.values()] == [12, 4, 4, 4, scratch]
    assert cells["scratch_24px"]["info"]["training_tflops"] == pytest.approx(
        TRAINING_FLOPS_PER_FORWARD * scratch * 8 * gflops[24] / 1e3)
    assert cells["finetune_24px_interpolated"]["info"]["training_tflops"] == pytest.approx(
        TRAINING_FLOPS_PER_FORWARD * 8 * (12 * gflops[16] + 4 * gflops[24]) / 1e3)
    assert cells["finetune_24px_interpolated"]["info"]["tokens"] == 36 + 1
    for key, cell in cells.items():
        assert 0.0 <= cell["top1"] <= 100.0 and cell["num_test"] == 18, key
    pre = out / "cells" / "pretrain_16px" / "model.safetensors"
    ft = json.loads((out / "cells" / "finetune_24px_interpolated" / "config.json").read_text())
    assert ft["init"] == str(pre.resolve()) and ft["image_size"] == 24 and ft["optimizer"] == "sgd"
    kept = json.loads((out / "cells" / "finetune_24px_not-interpolated" / "config.json").read_text())["init"]
    assert kept.endswith("inits/not-interpolated_24px.safetensors")
    assert torch.equal(vitlab.load(kept).pos_embed[0, 1:].reshape(6, 6, 16)[:4, :4],
                       vitlab.load(pre).pos_embed[0, 1:].reshape(4, 4, 16))
    assert (out / "resolution.png").stat().st_size > 0 and "| scratch_24px | 24 |" in summary["table"]

    monkeypatch.setattr(vitlab.train, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    again = resolution(tiny_data, out, **kwargs)
    assert [c["top1"] for c in again["cells"]] == [c["top1"] for c in summary["cells"]]
    with pytest.raises(ValueError, match="finetune_steps: stored 4 vs now 5"):
        resolution(tiny_data, out, **{**kwargs, "finetune_steps": 5})


def test_budget_gives_pretraining_and_fine_tunes_their_share(tiny_data, tmp_path, monkeypatch) -> None:
    from vitlab.bench.flops import count_flops
    from vitlab.model import config_from_name
    import vitlab.study.resolution as module

    seconds = {16: 0.01, 24: 0.03}
    monkeypatch.setattr(runner, "probe_step_seconds", lambda config, num_classes: seconds[config.image_size])
    monkeypatch.setattr(runner, "probe_decode_seconds", lambda data_dir, image_size: 1e-3)
    monkeypatch.setattr(module, "run_cells", lambda cells, *a, **k: [])  # plan only
    summary = resolution(tiny_data, tmp_path / "b", model=TINY_VIT, sizes=[16, 24], budget_minutes=2.0,
                         finetune_ratio=0.5, sets=TINY_RECIPE, progress=False)
    plan = summary["plan"]
    gflops = {s: count_flops(config_from_name("ViT-Ti/16", num_classes=3, image_size=s, patch_size=4, width=16,
                                              depth=1, num_heads=2, mlp_dim=32)) / 1e9 for s in (16, 24)}

    def estimate(n_pre: int) -> float:
        """Seconds of the five cells by hand: steps x probe x pipeline factor, plus decoding 60 + 18 images, the
        per-cell overhead and one test evaluation (a third of a step per batch of 8 images)."""
        n_ft = round(0.5 * n_pre)
        scratch = round((n_pre * gflops[16] + n_ft * gflops[24]) / gflops[24])
        cells = [(16, n_pre), (16, n_ft), (24, n_ft), (24, n_ft), (24, scratch)]
        return sum(seconds[s] * runner.PIPELINE_FACTOR * n + 1e-3 * 78 + runner.CELL_OVERHEAD_SECONDS
                   + seconds[s] / 3 / 8 * 18 for s, n in cells)

    n_pre = plan["pretrain_steps"]
    assert plan["finetune_steps"] == round(0.5 * n_pre)
    assert estimate(n_pre) <= 120.0 < estimate(n_pre + 2)
    assert plan["estimated_minutes"] == pytest.approx(estimate(n_pre) / 60, abs=0.01)


def test_refusals(tiny_data, tmp_path, capsys) -> None:
    from vitlab.cli import main

    base = ["study", "resolution", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--model", TINY_VIT,
            "--pretrain-steps", "1", "--finetune-steps", "1", "--set", "image_size=16"]
    cases = [(["--sizes", "16,18"], "--sizes: 18 px not a multiple of the model's 4-px patch (e.g. 16 or 20)"),
             (["--sizes", "8,16"], "--sizes: [8] below the pre-training resolution 16 px"),
             (["--model", TINY_VIT + ":pos_embed=sincos-2d"], "learned 1D position embedding"),
             (["--model", "ResNet-26"], "ResNet-26 has none"),
             (["--set", "num_classes=2"], "has 3 classes but num_classes=2 gives the head only 2 outputs")]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["study", "resolution", "--data", str(tiny_data), "--out", str(tmp_path / "s")]) == 2
    assert "give --pretrain-steps and --finetune-steps, or --budget-minutes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
