"""The study machinery on tiny settings: two fractions x two models, a few steps; resume; the budget rule;
patch-size and position-embedding cells. Accuracies are not checked, only what the studies compute and write."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import vitlab.train
from tests.study.conftest import TINY_RECIPE, TINY_RESNET, TINY_VIT
from vitlab.study import runner, studies


def _no_training(*args, **kwargs):
    raise AssertionError("a finished cell was trained again")


def test_data_size_runs_resumes_and_refuses_a_different_request(tiny_data, tmp_path, monkeypatch) -> None:
    out = tmp_path / "study"
    kwargs = dict(models=[TINY_VIT, TINY_RESNET], fractions=[1.0, 0.5], steps=2, sets=TINY_RECIPE, progress=False,
                  steps_rule="same")
    summary = studies.data_size(tiny_data, out, **kwargs)
    cells = summary["cells"]
    assert summary["complete"] and len(cells) == 4
    assert [(c["label"]["fraction"], c["label"]["model"]) for c in cells] == [
        (0.5, TINY_VIT), (0.5, TINY_RESNET), (1.0, TINY_VIT), (1.0, TINY_RESNET)]  # small subsets first
    for c in cells:
        assert c["steps"] == 2 and 0.0 <= c["top1"] <= 100.0 and c["num_test"] == 18
        assert c["num_train"] == {0.5: 30, 1.0: 60}[c["label"]["fraction"]]
    by_fraction = {}
    for c in cells:  # both models saw exactly the same images
        by_fraction.setdefault(c["label"]["fraction"], set()).add(c["info"]["subset_digest"])
    assert all(len(d) == 1 for d in by_fraction.values())
    assert json.loads((out / "data-size.json").read_text())["cells"] == json.loads(json.dumps(cells))
    assert (out / "data-size.png").stat().st_size > 0 and "| ResNet-26" in (out / "data-size.md").read_text()
    assert (out / "cells" / cells[1]["key"] / "model.safetensors").is_file()

    # Resume: nothing finished is redone (train would raise) and the summary is the same.
    monkeypatch.setattr(vitlab.train, "train", _no_training)
    again = studies.data_size(tiny_data, out, **kwargs)
    assert [c["top1"] for c in again["cells"]] == [c["top1"] for c in cells]

    # A different request in the same directory is refused, naming what changed.
    with pytest.raises(ValueError, match=r"fractions: stored \[0.5, 1.0\]"):
        studies.data_size(tiny_data, out, **{**kwargs, "fractions": [0.5, 0.25]})
    with pytest.raises(ValueError, match="recipe.lr"):
        studies.data_size(tiny_data, out, **{**kwargs, "sets": TINY_RECIPE + ["lr=0.1"]})


def test_only_unfinished_cells_run_and_interrupted_cells_are_not_recorded(tiny_data, tmp_path, monkeypatch) -> None:
    out = tmp_path / "study"
    kwargs = dict(model=TINY_VIT, kinds=["none", "learned-1d"], steps=2, sets=TINY_RECIPE, progress=False)
    first = studies.pos_embed(tiny_data, out, **kwargs)
    finished = first["cells"][1]["key"]
    (out / "results" / f"{finished}.json").unlink()
    calls = []
    real_train = vitlab.train.engine.train

    def counting(config, data_dir, run_dir, *, resume=False, progress=None):
        calls.append((run_dir.name, resume))
        return real_train(config, data_dir, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(vitlab.train, "train", counting)
    second = studies.pos_embed(tiny_data, out, **kwargs)
    assert calls == [(finished, True)]  # only the missing cell, continued from its checkpoint
    assert second["cells"][1]["top1"] == first["cells"][1]["top1"]

    monkeypatch.setattr(vitlab.train, "train", lambda *a, **k: {"interrupted": True, "step": 1})
    (out / "results" / f"{finished}.json").unlink()
    third = studies.pos_embed(tiny_data, out, **kwargs)
    assert not third["complete"] and len(third["cells"]) == 1
    assert not (out / "results" / f"{finished}.json").exists()


def test_pos_embed_topology_scores(tiny_data, tmp_path) -> None:
    summary = studies.pos_embed(tiny_data, tmp_path / "pe", model=TINY_VIT, kinds=["none", "learned-1d", "sincos-2d"],
                                steps=2, sets=TINY_RECIPE, progress=False)
    none, learned, sincos = summary["cells"]
    assert none["topology"] is None and none["topology_init"] is None
    assert abs(learned["topology_init"]) < 0.35  # random N(0, 0.02) embeddings carry no grid structure
    assert sincos["topology"] == pytest.approx(sincos["topology_init"]) and sincos["topology"] < -0.8  # fixed
    assert (tmp_path / "pe" / "pos-embed_learned-1d_similarity.png").is_file()
    assert "| sincos-2d |" in summary["table"]


def test_patch_size_sequence_and_flops(tiny_data, tmp_path) -> None:
    from vitlab.bench.flops import count_flops
    from vitlab.model import config_from_name

    summary = studies.patch_size(tiny_data, tmp_path / "ps", model=TINY_VIT, patch_sizes=[2, 8, 4], steps=1,
                                 sets=TINY_RECIPE, progress=False)
    info = [c["info"] for c in summary["cells"]]
    assert [i["patch_size"] for i in info] == [8, 4, 2] and [i["sequence_length"] for i in info] == [4, 16, 64]
    for i in info:
        cfg = config_from_name("ViT-Ti/16", num_classes=3, image_size=16, width=16, depth=1, num_heads=2, mlp_dim=32,
                               patch_size=i["patch_size"])
        assert i["gflops_per_image"] == pytest.approx(count_flops(cfg) / 1e9)
    assert (tmp_path / "ps" / "patch-size.png").is_file()


def test_budget_turns_minutes_into_steps(tiny_data, tmp_path, monkeypatch) -> None:
    seconds = {"ViT-Ti/16": 0.2, "ResNet-26": 0.1}
    monkeypatch.setattr(runner, "probe_step_seconds", lambda config, num_classes: seconds[config.model])
    monkeypatch.setattr(runner, "probe_decode_seconds", lambda data_dir, image_size: 1e-3)
    base = studies.base_config(None, TINY_RECIPE)
    cells = [runner.Cell(key=f"{m}{i}", label={}, config=studies.cell_config(base, spec, 100), data_dir=tiny_data,
                         num_train=1000, num_test=200)
             for i in range(2) for m, spec in (("v", TINY_VIT), ("r", TINY_RESNET))]
    plan = runner.steps_for_budget(cells, budget_minutes=2.0, num_classes=3)
    per_step = 2 * (0.2 + 0.1) * runner.PIPELINE_FACTOR
    fixed = 4 * (1200 * 1e-3 + runner.CELL_OVERHEAD_SECONDS) + 2 * 25 * (0.2 + 0.1) / 3  # ceil(200 / 8) batches
    assert plan["steps"] == int((120.0 - fixed) / per_step)
    assert plan["estimated_minutes"] == pytest.approx((fixed + plan["steps"] * per_step) / 60, abs=0.01)
    assert runner.steps_for_budget(cells, budget_minutes=0.01, num_classes=3)["steps"] == runner.MIN_STEPS


def test_probes_time_a_real_step_and_decoding(tiny_data) -> None:
    base = studies.base_config(None, TINY_RECIPE)
    t = runner.probe_step_seconds(studies.cell_config(base, TINY_VIT, 10), 3, steps=1, warmup=1)
    assert 0.0 < t < 30.0
    assert 0.0 < runner.probe_decode_seconds(tiny_data, 16) < 1.0


def test_other_load_is_the_machines_busy_time_less_this_processs(monkeypatch) -> None:
    clock = {"busy": 100.0, "own": 10.0, "t": 50.0}
    monkeypatch.setattr(runner, "_machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(runner, "_own_cpu_seconds", lambda: clock["own"])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock["t"])
    with runner.OtherLoad() as load:
        clock.update(busy=105.0, own=12.0, t=52.0)  # 5 busy seconds in 2 s, 2 of them this process's
    assert load.cores == pytest.approx(1.5)
    monkeypatch.setattr(runner, "_machine_busy_seconds", lambda: None)  # no /proc/stat: no reading, no guess
    with runner.OtherLoad() as load:
        pass
    assert load.cores is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_machine_busy_time_counts_this_processs_cpu_time() -> None:
    busy0, own0, t0 = runner._machine_busy_seconds(), runner._own_cpu_seconds(), time.perf_counter()
    while runner._own_cpu_seconds() - own0 < 0.5:
        pass
    busy, own, wall = runner._machine_busy_seconds() - busy0, runner._own_cpu_seconds() - own0, time.perf_counter() - t0
    assert busy >= 0.9 * own - 0.02  # the machine's busy time includes ours (to a clock tick)
    assert busy <= (os.cpu_count() or 1) * wall * 1.05 + 0.02


class _FakeLoad:
    readings: list[float] = []

    def __enter__(self):
        self.cores = _FakeLoad.readings.pop(0)
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("readings, tries_used, gave_up", [([1.5, 0.0], 2, False), ([1.5, 1.5, 1.5], 3, True),
                                                             ([0.1], 1, False)])
def test_step_probe_times_again_while_the_cpu_is_shared(readings, tries_used, gave_up, monkeypatch, caplog) -> None:
    _FakeLoad.readings = list(readings)
    monkeypatch.setattr(runner, "OtherLoad", _FakeLoad)
    base = studies.base_config(None, TINY_RECIPE)
    with caplog.at_level("WARNING", logger=runner.__name__):
        t = runner.probe_step_seconds(studies.cell_config(base, TINY_VIT, 10), 3, steps=1, warmup=1, retry_wait=0)
    assert 0.0 < t < 30.0
    assert len(readings) - len(_FakeLoad.readings) == tries_used
    assert sum("timing again" in r.message for r in caplog.records) == tries_used - 1
    assert any("stayed shared" in r.message for r in caplog.records) == gave_up


def test_model_specs_and_cli_errors(tiny_data, tmp_path, capsys) -> None:
    from vitlab.cli import main

    assert runner.parse_model_spec("ViT-Ti/16:patch_size=4:classifier=gap") == (
        "ViT-Ti/16", {"patch_size": 4, "classifier": "gap"})
    assert runner.model_slug("ViT-Ti/16:depth=2") == "ViT-Ti-16_depth2"
    with pytest.raises(ValueError, match="known names"):
        runner.parse_model_spec("ViT-Q/16")
    with pytest.raises(ValueError, match="expected NAME"):
        runner.parse_model_spec("ViT-Ti/16:depth")
    assert main(["study", "data-size", "--data", str(tiny_data), "--out", str(tmp_path / "x"),
                 "--models", "ResNet-77", "--steps", "1"]) == 2
    assert "ResNet-77" in capsys.readouterr().err
    assert main(["study", "pos-embed", "--data", str(tiny_data), "--out", str(tmp_path / "y"),
                 "--kinds", "learned-3d", "--steps", "1"]) == 2
    assert "learned-3d" in capsys.readouterr().err


def test_cli_runs_a_study(tiny_data, tmp_path, capsys) -> None:
    from vitlab.cli import main

    sets = [a for s in TINY_RECIPE for a in ("--set", s)]
    assert main(["study", "patch-size", "--data", str(tiny_data), "--out", str(tmp_path / "p"), "--model", TINY_VIT,
                 "--patch-sizes", "8", "--steps", "1", *sets]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 4 |" in out and "1 steps per cell" in out


def test_cli_defaults_are_the_published_models() -> None:
    from vitlab.cli import study as cli_study

    assert (cli_study.DEFAULT_VIT, cli_study.DEFAULT_RESNET) == (studies.DEFAULT_VIT, studies.DEFAULT_RESNET)
    runner.parse_model_spec(studies.DEFAULT_VIT)
    runner.parse_model_spec(studies.DEFAULT_RESNET)


@pytest.mark.parametrize("kind", studies.POS_EMBED_KINDS)
def test_every_pos_embed_kind_evaluates_under_bf16_autocast(kind: str) -> None:
    """The pos-embed study evaluates each kind in eval mode under the recipe's bf16 autocast; without a position
    embedding the token stream stays bf16 (nothing fp32 is added to it), a case the other kinds never reach."""
    import torch

    from vitlab.model import create_model

    model = create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1, num_heads=2,
                         mlp_dim=64, classifier="gap", pos_embed=kind).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.head.weight.normal_()  # the zero-initialised head would make every output equal
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == (2, 3)
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.1)


def test_data_size_as_the_paper_ran_it(tiny_data, tmp_path) -> None:
    """Proportional rule: a validation split carved from train/ (never a test image, never a training image of any
    cell), steps in proportion to each subset, and the test split evaluated once with the best validation weights."""
    import os

    import vitlab
    from vitlab.train.evaluate import evaluate

    out = tmp_path / "ds"
    summary = studies.data_size(tiny_data, out, models=[TINY_VIT], fractions=[0.5, 1.0], epochs=3.0,
                                val_fraction=0.25, evaluations=3, min_steps=4, sets=TINY_RECIPE, progress=False)
    half, full = summary["cells"]
    # 20 images per class: 5 carved for validation, 15 left; half of those is round(7.5) = 8 per class.
    assert (half["num_train"], full["num_train"]) == (24, 45)
    assert (half["steps"], full["steps"]) == (round(3.0 * 24 / 8), round(3.0 * 45 / 8))  # 9 and 17
    val_links = {}
    for cell in (half, full):
        root = out / "subsets" / f"frac_{cell['label']['fraction']:g}"
        real = {split: {os.path.realpath(p) for p in (root / split).rglob("*.png")} for split in ("train", "val")}
        test = {os.path.realpath(p) for p in (root / "test").rglob("*.png")}
        assert len(real["val"]) == 15 and len(test) == 18
        assert not real["val"] & real["train"] and not real["val"] & test and not real["train"] & test
        assert all(p.startswith(str((tiny_data / "train").resolve())) for p in real["val"])
        val_links[cell["key"]] = real["val"]
        run = out / "cells" / cell["key"]
        vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in vals if r.get("split") == "val"]
        assert len(vals) == 3 and vals[-1]["step"] == cell["steps"]  # three evaluations, the last at the end
        top = max(r["top1"] for r in vals)
        assert cell["val_top1"] == top and cell["best_step"] == next(r["step"] for r in vals if r["top1"] == top)
        best = vitlab.load(run / "best.safetensors")
        test_eval = evaluate(best, tiny_data / "test", image_size=16, workers=0)
        assert cell["top1"] == test_eval["top1"] and cell["num_test"] == 18
    assert val_links[half["key"]] == val_links[full["key"]]  # one validation split for every cell
    assert "| best validation step |" in summary["table"]


def test_proportional_budget_picks_the_epochs_that_fit(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "probe_step_seconds", lambda config, num_classes: 0.05)
    monkeypatch.setattr(runner, "probe_decode_seconds", lambda data_dir, image_size: 1e-3)
    monkeypatch.setattr(studies, "run_cells", lambda cells, *a, **k: [])  # plan only
    summary = studies.data_size(tiny_data, tmp_path / "b", models=[TINY_VIT, TINY_RESNET], fractions=[0.5, 1.0],
                                budget_minutes=1.0, val_fraction=0.25, evaluations=4, min_steps=4, max_steps=200,
                                sets=TINY_RECIPE, progress=False)
    plan = summary["plan"]

    def estimate(epochs: float) -> float:
        """By hand: steps = clamp(round(epochs * n / 8), 4, 200) per cell, 0.05 s x pipeline factor each; decoding
        train + 18 test + 15 validation images; overhead; the test split once and the validation split 4 times."""
        total = 0.0
        for n in (24, 24, 45, 45):
            steps = min(200, max(4, round(epochs * n / 8)))
            total += 0.05 * runner.PIPELINE_FACTOR * steps + 1e-3 * (n + 18 + 15) + runner.CELL_OVERHEAD_SECONDS
            total += 0.05 / 3 / 8 * (18 + 4 * 15)
        return total

    assert estimate(plan["epochs"]) <= 60.0 < estimate(plan["epochs"] + 0.01)
    assert plan["steps"] == [min(200, max(4, round(plan["epochs"] * n / 8))) for n in (24, 24, 45, 45)]


def test_fit_budget_is_the_largest_that_fits() -> None:
    costs = runner.CellCosts(per_step=[0.5, 1.0], fixed=[10.0, 20.0], probes={}, decode=0.0)
    # seconds(x) = 30 + 0.5 * round(2x) + 1.0 * (10 + round(x)); a 2-minute budget leaves 80 s for 0.5*2x + x.
    x = runner.fit_budget(costs, lambda x: [round(2 * x), 10 + round(x)], 2.0)
    assert 30 + 0.5 * round(2 * x) + 10 + round(x) <= 120 and round(x) == 40
    assert runner.fit_budget(costs, lambda x: [round(x), 1000], 1.0) == 0.0  # not even the minimum fits


def test_data_size_refuses_mixed_rules(tiny_data, tmp_path, capsys) -> None:
    from vitlab.cli import main

    with pytest.raises(ValueError, match="with the proportional rule give --epochs"):
        studies.data_size(tiny_data, tmp_path / "a", models=[TINY_VIT], fractions=[1.0], steps=3)
    assert main(["study", "data-size", "--data", str(tiny_data), "--out", str(tmp_path / "b"),
                 "--models", TINY_VIT]) == 2
    assert "needs --epochs or --budget-minutes" in capsys.readouterr().err
    assert main(["study", "data-size", "--data", str(tiny_data), "--out", str(tmp_path / "c"), "--models", TINY_VIT,
                 "--epochs", "1", "--val-fraction", "1.5"]) == 2
    assert "validation fraction must be in (0, 1)" in capsys.readouterr().err
