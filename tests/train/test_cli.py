"""The train / eval / predict / plot / demo commands, called through ``vitlab.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
from tests.train.tiny import make_folder, tiny_overrides
from vitlab.cli import main
from vitlab.train import evaluate


def _sets(**extra):
    out = []
    for s in tiny_overrides(**extra):
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_folder(root / "data")
    assert main(["train", "--config", "demo", "--data", str(data), "--out", str(root / "run"), "--json",
                 *_sets(epochs=3, lr=0.003)]) == 0
    return data, root / "run"


def test_eval_json_and_confusion_png(trained, tmp_path, capsys):
    data, run = trained
    capsys.readouterr()
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "eval"
    assert main(["eval", str(run / "model.safetensors"), "--data", str(data), "--json", "--precision", "fp32",
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    direct = evaluate(vitlab.load(run / "model.safetensors"), data / "val", precision="fp32")
    assert result["top1"] == direct["top1"] and result["n"] == 12
    assert sum(map(sum, result["confusion"])) == 12
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "eval.json").read_text())["top1"] == result["top1"]
    # Without --out nothing is written, and never beside the checkpoint it only reads.
    assert main(["eval", str(run / "model.safetensors"), "--data", str(data), "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.startswith(f"{run / 'model.safetensors'} on {data / 'val'}: top-1")
    assert sorted(p.name for p in run.iterdir()) == before


def test_predict_matches_the_model(trained, capsys):
    data, run = trained
    image = sorted((data / "val" / "c2").iterdir())[0]
    capsys.readouterr()
    args = ["predict", str(run / "model.safetensors"), str(image), str(data / "val" / "c0"), "--json", "--top-k", "2"]
    assert main(args + ["--precision", "fp32"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert main(args) == 0  # precision auto: bf16 where the CPU has it natively, else fp32
    auto = json.loads(capsys.readouterr().out)
    assert len(results) == 1 + 4 and results[0]["path"] == str(image)
    model = vitlab.load(run / "model.safetensors")
    from PIL import Image

    from vitlab.data.transforms import eval_transform

    with torch.no_grad():
        probs = model(eval_transform(16)(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]
    top = results[0]["top"]
    assert len(top) == 2 and top[0]["label"] == ["c0", "c1", "c2"][int(probs.argmax())]
    assert top[0]["prob"] == pytest.approx(float(probs.max()), rel=1e-4)
    assert auto[0]["top"][0]["prob"] == pytest.approx(float(probs.max()), rel=1e-2)  # bf16 rounding at most


def test_predict_reports_unreadable_file(trained, tmp_path, capsys):
    _, run = trained
    bad = tmp_path / "x.jpg"
    bad.write_text("no")
    assert main(["predict", str(run / "model.safetensors"), str(bad)]) == 1
    assert "x.jpg: unreadable" in capsys.readouterr().out


def test_plot_draws_png(trained, capsys):
    _, run = trained
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_give_one_clear_error(trained, tmp_path, capsys):
    data, _ = trained
    assert main(["train", "--config", "demo", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--set", "lr=fast"]) == 2
    assert "lr='fast'" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                 *_sets()]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--data", str(data)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2


@pytest.mark.slow
def test_demo_on_the_shipped_sample(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "budget_minutes=0.05", "--set", "threads=2",
                 "--set", "model_overrides.depth=1", "--set", "eval_every=0"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy of the saved checkpoint" in out and "on 1000 images" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file()
