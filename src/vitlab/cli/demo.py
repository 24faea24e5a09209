"""``vitlab demo``: train the ``demo`` preset on the CIFAR-10 sample shipped in the package, reload the saved
checkpoint, evaluate it on the sample's test images and print the accuracy (the README's first command)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vitlab.cli.common import UsageError


def run(args: argparse.Namespace) -> int:
    from vitlab.data import sample_root
    from vitlab.train import RunFolderBusy, evaluate, load_config, train
    from vitlab.train.inference import load_for_inference

    try:
        config = load_config("demo", args.set or [])
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    data = sample_root()
    print(f"training {config.model} {config.model_overrides} on {data} for at most "
          f"{config.budget_minutes} minutes -> {out}", flush=True)
    start = time.perf_counter()
    try:
        result = train(config, data, out)
    except (ValueError, FileNotFoundError, FileExistsError, RunFolderBusy) as e:
        raise UsageError(str(e)) from None
    if result.get("interrupted"):
        print(f"vitlab demo: stopped by {result['signal']} at step {result['step']}; continue with vitlab train "
              f"--config demo --data {data} --out {out} --resume", file=sys.stderr)
        return 0
    minutes = (time.perf_counter() - start) / 60
    model, classes = load_for_inference(out / "model.safetensors")
    check = evaluate(model, data / "test", classes=classes, precision=config.precision)
    print(f"trained {result['epochs']:.1f} epochs in {minutes:.1f} min ({result['train_img_per_s']:.0f} img/s)")
    print(f"test accuracy of the saved checkpoint {out / 'model.safetensors'}: top-1 {check['top1']:.2f}% "
          f"top-5 {check['top5']:.2f}% on {check['n']} images")
    print(f"next: vitlab eval {out / 'model.safetensors'} --data {data / 'test'};  vitlab plot {out}")
    return 0 if check["n"] > 0 else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small ViT on the bundled CIFAR-10 sample and report accuracy")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo preset key")
    p.set_defaults(func=run)
