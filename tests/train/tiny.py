"""Tiny generated image folders and configs for the training tests (16-32 px, a few classes, seconds to train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def make_folder(root: Path, *, classes: int = 3, per_class: int = 16, val_per_class: int = 4, size: int = 16,
                seed: int = 0) -> Path:
    """``root/{train,val}/c{i}/*.png``: noisy images whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


TINY_MODEL = {"patch_size": 4, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}


def tiny_overrides(**extra: object) -> list[str]:
    """``--set`` strings for a tiny, deterministic fp32 run on 16-px images."""
    sets = ["model=ViT-Ti/16", "image_size=16", "batch_size=8", "epochs=2", "lr=0.001", "precision=fp32",
            "threads=1", "eval_every=0", "log_every=1", "warmup_steps=2", "crop=inception", "randaugment_n=1",
            "in_memory=true", "workers=0", "budget_minutes=null",
            "low_res_size=null"]
    sets += [f"model_overrides.{k}={v}" for k, v in TINY_MODEL.items()]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return sets
