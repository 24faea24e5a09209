"""``vitlab inspect`` end to end: checkpoint loading, image reading and resizing, resolution change, input scaling,
argument errors, and the written PNG/JSON files agreeing with the library functions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitlab
from tests.analysis.reference import random_model
from tests.conftest import FIXTURES, REPO, require
from vitlab.analysis import attention_rollout, mean_attention_distance, pos_embed_topology
from vitlab.analysis.images import input_normalization, list_images, read_images
from vitlab.model.posembed import resample_pos_embed
from vitlab.cli import main
from vitlab.data import sample_root
from vitlab.train.inference import load_for_inference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = random_model(image_size=16, patch_size=4, depth=2, num_heads=2, num_classes=10)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    vitlab.save(model, path, labels=[f"class{i}" for i in range(10)])
    return path, model


def test_cli_writes_figures_and_numbers(checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    path, model = checkpoint
    out = tmp_path / "out"
    rc = main(["inspect", str(path), "--out", str(out), "--num-images", "6", "--layer", "2", "--head", "1",
               "--query", "1,2", "--k", "5", "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().out
    for name in ("filters", "pos_embed", "attention_distance", "rollout", "query_attention"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) < 300_000
        assert (out / f"{name}.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["normalization"]["source"] == "official"
    # The JSON numbers are those of the library functions on the same images (default: the bundled sample).
    paths = list_images(sample_root() / "test", 6)
    x, _ = read_images(paths, (16, 16), (0.5,) * 3, (0.5,) * 3)
    dist = json.loads((out / "attention_distance.json").read_text())
    torch.testing.assert_close(torch.tensor(dist["pixels"]), mean_attention_distance(model, x), atol=2e-3, rtol=0)
    roll = json.loads((out / "rollout.json").read_text())
    torch.testing.assert_close(torch.tensor(roll["images"][0]["map"]), attention_rollout(model, x[:1])[0],
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        assert roll["images"][0]["prediction"] == f"class{int(model(x[:1]).argmax())}"  # the checkpoint's labels
    pos = json.loads((out / "pos_embed.json").read_text())
    assert pos["spearman"] == pytest.approx(pos_embed_topology(model)["spearman"])
    query = json.loads((out / "query_attention.json").read_text())
    assert query["layers"] == [2] and query["head"] == "head 1" and query["query"] == "patch (row 1, col 2)"
    with torch.no_grad():
        expected = model.attention_maps(x[:1])[1][0, 0, 1 + 1 * 4 + 2, 1:].reshape(4, 4)
    torch.testing.assert_close(torch.tensor(query["images"][0]["maps"][0]), expected, atol=1e-4, rtol=0)
    assert len(json.loads((out / "filters.json").read_text())["explained_variance"]) == 5
    # images are spread over the classes, not the first six airplanes
    assert len({p.parent.name for p in paths}) == 6


def test_images_of_any_size_and_mode_are_resized(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("L", (30, 40), 200).save(folder / "gray.png")  # grayscale
    Image.new("RGBA", (9, 7), (50, 50, 50, 255)).save(folder / "sub" / "rgba.png")
    Image.fromarray(torch.randint(0, 255, (100, 61, 3), dtype=torch.uint8).numpy()).save(folder / "big.jpg")
    (folder / "notes.txt").write_text("not an image")
    paths = list_images(folder)
    assert [p.name for p in paths] == ["big.jpg", "gray.png", "rgba.png"]
    x, display = read_images(paths, (24, 32), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 3, 24, 32) and display.shape == (3, 3, 24, 32)
    torch.testing.assert_close(display[1], torch.full((3, 24, 32), 200 / 255))  # gray -> three equal channels
    torch.testing.assert_close(display[2], torch.full((3, 24, 32), 50 / 255))  # alpha dropped
    torch.testing.assert_close(x, display * 2 - 1)  # official scaling to [-1, 1]


def test_corrupt_image_is_named(tmp_path: Path, checkpoint: tuple[Path, torch.nn.Module],
                                capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="b.jpg"):
        read_images(list_images(folder), (16, 16))
    out = tmp_path / "out"
    rc = main(["inspect", str(checkpoint[0]), "--images", str(folder), "--out", str(out)])
    assert rc == 2 and "b.jpg" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--images"):
        list_images(tmp_path / "missing")


def test_other_resolution_resamples_position_embedding(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, model = checkpoint
    resized, _ = load_for_inference(path, image_size=24)
    assert resized.config.image_hw == (24, 24) and resized.config.grid_size == (6, 6)
    torch.testing.assert_close(resized.pos_embed, resample_pos_embed(model.pos_embed.detach(), (6, 6), (4, 4)))


@pytest.mark.parametrize("args,match", [
    (["--layer", "3"], "--layer 3 is outside 1..2"),
    (["--head", "5"], "--head 5 is outside 1..2"),
    (["--query", "4,0"], "outside the 4x4 patch grid"),
    (["--query", "middle"], "--query must be 'cls' or 'row,col'"),
])
def test_bad_arguments_are_named(checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path, args: list[str],
                                 match: str, capsys: pytest.CaptureFixture) -> None:
    rc = main(["inspect", str(checkpoint[0]), "--out", str(tmp_path / "o"), "--num-images", "1", *args])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a bad argument


def test_missing_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["inspect", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_input_scaling_comes_from_the_checkpoint(checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, model = checkpoint
    assert input_normalization(model, path)[:2] == ((0.5,) * 3, (0.5,) * 3)  # nothing recorded: official
    (path.parent / "config.json").write_text(json.dumps({"model": "ViT-Ti/16", "normalize": "imagenet"}))
    mean, std, source = input_normalization(model, path)
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225) and "config.json" in source
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    assert input_normalization(model, hf)[:2] == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))


def test_gap_model_defaults_to_centre_patch(tmp_path: Path) -> None:
    model = random_model(classifier="gap", pos_embed="sincos-2d", image_size=16, patch_size=4)
    path = tmp_path / "gap.safetensors"
    vitlab.save(model, path)
    out = tmp_path / "out"
    assert main(["inspect", str(path), "--out", str(out), "--num-images", "2", "--k", "3"]) == 0
    query = json.loads((out / "query_attention.json").read_text())
    assert query["query"] == "patch (row 2, col 2)"
    assert json.loads((out / "rollout.json").read_text())["row"] == "mean over tokens (GAP)"


def test_subprocess_entry_point(checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    # the real command line, at another resolution than the checkpoint's (16 px -> 24 px: grid 4x4 -> 6x6)
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "vitlab", "inspect", str(checkpoint[0]), "--out", str(out),
                           "--num-images", "2", "--threads", "1", "--image-size", "24"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Spearman" in proc.stdout and (out / "summary.json").is_file()
    assert json.loads((out / "pos_embed.json").read_text())["grid"] == [6, 6]
    with Image.open(out / "rollout.png") as img:
        img.verify()  # a complete, valid PNG


@pytest.mark.parametrize("name,has_filters", [("vit_tiny_p4_32", True), ("hybrid_r2x2w05_vit_tiny_32", False)])
def test_official_npz_checkpoints(name: str, has_filters: bool, tmp_path: Path) -> None:
    path = require(FIXTURES / f"{name}.params.npz")
    out = tmp_path / name
    assert main(["inspect", str(path), "--out", str(out), "--num-images", "2", "--k", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert ("filters.png" in summary["files"]) == has_filters
    assert ("filters" in summary["skipped"]) == (not has_filters)
    model = vitlab.load(path)
    assert summary["pos_embed"]["spearman"] == pytest.approx(pos_embed_topology(model)["spearman"])
    # hybrid: 8-px effective patches on a 4x4 grid; plain: 4-px patches on 8x8
    assert summary["attention_distance"]["patch_size_px"] == ([4, 4] if has_filters else [8, 8])
