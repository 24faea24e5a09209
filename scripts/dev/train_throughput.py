"""Throughput of the training pieces on this machine, written as JSON: the data loader alone (in-memory batch
augmentation and the streaming DataLoader path) and the train step (forward + backward + AdamW) per precision.

    python scripts/dev/train_throughput.py --config small-scratch --data ../shared/datasets/cifar10 \
        --out results/train/small-scratch-throughput-avx512bf16-cifar10.json \
        [--set key=value ...] [--steps 20] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def time_loader(batches, epoch_len: int, global_batch: int, steps: int) -> float:
    """Images per second produced by ``batches.epoch`` alone (median over ``steps`` batches after 2 warm-up)."""
    it = batches.epoch(0, 0, global_batch)
    times = []
    for i in range(min(steps + 2, epoch_len)):
        t = time.perf_counter()
        x, y, _ = next(it)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return global_batch / statistics.median(times)


def main() -> None:
    from vitlab.data.folder import SafeImageFolder, load_in_memory, split_dirs
    from vitlab.data.loaders import FolderBatches, InMemoryBatches
    from vitlab.train import build_model, load_config
    from vitlab.train.engine import batch_augment, build_optimizer, image_transform, train_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small-scratch")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (bf16)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    train_dir, _ = split_dirs(args.data)
    out: dict = {"config": cfg.to_dict(), "threads": args.threads, "torch": torch.__version__,
                 "machine": platform.processor() or platform.machine(), "batch_size": cfg.batch_size}

    t = time.perf_counter()
    data = load_in_memory(train_dir, cfg.image_size)
    out["decode_img_per_s"] = len(data.labels) / (time.perf_counter() - t)
    mem = InMemoryBatches(data, batch_augment(cfg), seed=0, num_classes=len(data.classes), mixup=cfg.mixup,
                          cutmix=cfg.cutmix, mix_prob=cfg.mix_prob)
    out["loader_in_memory_img_per_s"] = time_loader(mem, mem.steps_per_epoch(cfg.batch_size), cfg.batch_size,
                                                    args.steps)
    tf = image_transform(cfg)
    for workers in (0, args.threads):
        fb = FolderBatches(SafeImageFolder(train_dir, tf), seed=0, num_classes=len(data.classes), workers=workers,
                           global_batch=cfg.batch_size, mixup=cfg.mixup, cutmix=cfg.cutmix,
                           mix_prob=cfg.mix_prob)
        out[f"loader_stream_workers{workers}_img_per_s"] = time_loader(fb, fb.steps_per_epoch(cfg.batch_size),
                                                                       cfg.batch_size, min(args.steps, 10))
        del fb

    x, y, _ = next(mem.epoch(0, 0, cfg.batch_size))
    runs = [(p, False, cfg.image_size) for p in args.precisions.split(",")]
    if cfg.low_res_size:  # the recipe's first phase: the same batches resized, fewer tokens
        runs += [(p, False, cfg.low_res_size) for p in args.precisions.split(",")]
    runs += [("bf16", True, cfg.image_size)] if args.compile else []
    for precision, compiled, size in runs:
        c = cfg.replace(precision=precision)
        torch.manual_seed(0)
        model = build_model(c, len(data.classes)).train()
        opt = build_optimizer(model, c)
        net = torch.compile(model) if compiled else model
        times = []
        for i in range(args.steps + 3):
            t = time.perf_counter()
            train_step(net, opt, [(x, y)], config=c, device=torch.device("cpu"), step=i, rank=0, lr=1e-4,
                       image_size=size)
            if i >= 3:
                times.append(time.perf_counter() - t)
        suffix = ("_compiled" if compiled else "") + ("" if size == cfg.image_size else f"_{size}px")
        key = f"train_step_{precision}{suffix}_img_per_s"
        out[key] = cfg.batch_size / statistics.median(times)
        print(key, round(out[key], 1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
