"""The paper's claim behind Fig. 7 centre, on real images: a learned 1D position embedding becomes topological
with training. A small ViT (patch 4 on 32 px CIFAR-10 images from the bundled sample) is trained for 100 steps
with ``vitlab.train`` on 2,000 of its images; the Spearman correlation between embedding similarity and grid distance goes from about 0
at initialisation to clearly negative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.analysis import pos_embed_topology
from vitlab.cli.inspect import inspect_checkpoint
from vitlab.data import sample_root

OVERRIDES = dict(patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128)


def _subset(root: Path, train: int, test: int) -> Path:
    """A smaller ImageFolder of links into the bundled sample: the first images of each class, so that decoding
    and the final evaluation stay a small part of the test's time."""
    for split, n in (("train", train), ("test", test)):
        for cls in sorted((sample_root() / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                (root / split / cls.name / f.name).symlink_to(f)
    return root


@pytest.mark.slow
def test_trained_position_embedding_becomes_topological(tmp_path: Path) -> None:
    from vitlab.train import TrainConfig, train

    # One thread: on a shared 2-core machine two threads of a model this small mostly wait for each other.
    config = TrainConfig(model="ViT-Ti/16", model_overrides=OVERRIDES, image_size=32, steps=100, batch_size=64,
                         lr=2e-3, warmup_steps=10, crop="pad", precision="fp32", eval_every=0, workers=0, seed=0,
                         threads=1, log_every=1000, checkpoint_every=100_000)
    torch.manual_seed(config.seed)
    init = vitlab.create_model("ViT-Ti/16", num_classes=10, image_size=32, **OVERRIDES)
    at_init = pos_embed_topology(init)["spearman"]

    result = train(config, _subset(tmp_path / "data", train=200, test=20), tmp_path / "run", progress=False)
    trained = vitlab.load(tmp_path / "run" / "model.safetensors")
    after = pos_embed_topology(trained)
    assert abs(at_init) < 0.1
    assert after["spearman"] < -0.25, after
    # neighbours (distance 1) became more similar than opposite corners
    assert after["mean_similarity"][0] > after["mean_similarity"][-1] + 0.2
    assert result["top1"] > 20.0  # it learned something (chance is 10%)

    # and the whole inspection runs on that checkpoint
    summary = inspect_checkpoint(trained, sample_root() / "test", tmp_path / "inspect", num_images=16,
                                 checkpoint=tmp_path / "run" / "model.safetensors")
    assert summary["pos_embed"]["spearman"] == pytest.approx(after["spearman"])
    assert "config.json" in summary["normalization"]["source"]
    dist = json.loads((tmp_path / "inspect" / "attention_distance.json").read_text())
    assert len(dist["pixels"]) == 2 and len(dist["pixels"][0]) == 4
