"""Where a bf16 training step's time goes, vitlab against timm: torch.profiler over two optimiser steps (forward,
cross-entropy, backward, fused AdamW) of each library's model with the same weights, printed as a table per
library. The attention's own time shows as ``_ReducedPrecisionAttention`` (vitlab) and the SDPA flash ops (timm).

    python scripts/dev/profile_train_step.py [--model ViT-S/16] [--batch 16] [--threads 2] [--rows 18]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.bench.models import bench_model, build_pair


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-S/16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = bench_model(args.model).config
    ours, theirs = build_pair(config)
    x = torch.randn(args.batch, 3, config.image_size, config.image_size)
    y = torch.randint(0, config.num_classes, (args.batch,))
    for name, model in (("vitlab", ours), ("timm", theirs)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            with torch.autocast("cpu", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            step()
        print(f"{name}: {args.model}, batch {args.batch}, two steps, {args.threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=50))


if __name__ == "__main__":
    main()
