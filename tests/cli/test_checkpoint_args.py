"""One checkpoint argument for every command that reads one: the same options, the same loading (including
``--image-size``, which resamples the position embedding as ``vitlab eval`` does, for ``fewshot`` too)."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
from tests.train.tiny import make_folder
from vitlab.cli import build_parser, main
from vitlab.model.posembed import resample_pos_embed


REQUIRED = {"eval": ["--data", "d"], "predict": ["img.png"], "fewshot": ["--data", "d"], "inspect": ["--out", "o"],
            "export": ["--to", "onnx"]}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_loading_command_takes_the_same_checkpoint_options(command):
    args = build_parser().parse_args([command, "ckpt.npz", "--format", "npz", "--model", "ViT-B/16",
                                      "--image-size", "384", *REQUIRED[command]])
    assert (args.checkpoint, args.format, args.model, args.image_size) == ("ckpt.npz", "npz", "ViT-B/16", 384)
    with pytest.raises(SystemExit):  # the formats are checked by the parser, the same for all
        build_parser().parse_args([command, "ckpt.npz", "--format", "onnx", *REQUIRED[command]])


def test_fewshot_image_size_resamples_the_model(tmp_path, capsys):
    from vitlab.study.fewshot import fewshot_evaluate

    data = make_folder(tmp_path / "data", size=24)
    torch.manual_seed(0)
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    path = vitlab.save(model, tmp_path / "m.safetensors")
    argv = ["fewshot", str(path), "--data", str(data), "--shots", "2", "--draws", "2", "--json"]
    assert main(argv + ["--image-size", "24"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_size"] == 24
    # The same numbers as the model resampled by hand (the official bilinear resize of the position embedding).
    resized = vitlab.load(path)
    resized.set_image_size(24)
    torch.testing.assert_close(resized.pos_embed, resample_pos_embed(model.pos_embed.detach(), (6, 6), (4, 4)))
    expected = fewshot_evaluate(resized, data, [2], draws=2)
    assert result["shots"] == json.loads(json.dumps(expected["shots"]))
