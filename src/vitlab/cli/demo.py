"""``vitlab demo``: build every named model, print its size and run one forward pass."""

from __future__ import annotations

import argparse
import time

import torch

from vitlab.model import create_model, list_models


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    print(f"{'model':<16} {'parameters':>14} {'tokens':>7} {'forward ms':>11}  logits")
    for name in list_models():
        model = create_model(name, num_classes=10).eval()
        size = model.config.image_hw
        x = torch.randn(1, 3, *size)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(x)
        ms = (time.perf_counter() - start) * 1e3
        n_params = sum(p.numel() for p in model.parameters())
        # A ResNet has no tokens; show the positions of its last feature map, which it pools the same way.
        cfg = model.config
        gh, gw = cfg.grid_size
        tokens = cfg.num_patches + cfg.num_prefix_tokens if hasattr(cfg, "num_patches") else gh * gw
        print(f"{name:<16} {n_params:>14,} {tokens:>7} {ms:>11.1f}  {tuple(logits.shape)}")
        del model
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="build every named model and run a forward pass")
    p.set_defaults(func=run)
