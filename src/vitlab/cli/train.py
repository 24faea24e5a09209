"""``vitlab train``: train or fine-tune from a preset or config file (see :mod:`vitlab.train`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    from vitlab.data.images import BadImageError
    from vitlab.train import NonFiniteLossError, RunFolderBusy, load_config, train

    overrides = list(args.set or [])
    if args.strict:
        overrides.append("strict=true")
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"vitlab train: {e}", file=sys.stderr)
        return 2
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 reports, for every rank
    try:
        result = train(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as e:  # may happen on one rank only: every rank says it
        return _fail(True, str(e), 1)
    except BadImageError as e:
        return _fail(True, f"unreadable image {e.path}: {e.reason}", 1)
    except (ValueError, FileNotFoundError, FileExistsError, RunFolderBusy) as e:  # the same on every rank
        return _fail(rank0, str(e), 2)
    except KeyboardInterrupt:  # outside the loop, whose own handler stops at a checkpoint
        return _fail(rank0, f"interrupted outside the training loop; {args.out} keeps its last checkpoint, if any",
                     130)
    if not rank0:
        return 0
    if result.get("interrupted"):
        print(f"vitlab train: stopped by {result.get('signal', 'a signal')} at step {result['step']}; checkpoint "
              f"saved in {args.out}; continue with --resume", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps(result))
    elif result.get("already_finished"):
        print(f"vitlab train: {args.out} is a finished run ({result['step']} steps); nothing to resume, no file "
              f"changed", file=sys.stderr)
    elif "top1" in result:
        print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['n']} images, "
              f"{result['train_img_per_s']:.0f} train img/s)  weights: {result.get('weights')}")
    else:
        print(f"done: {result['step']} steps; weights: {result.get('weights')}")
    return 0


def _fail(rank0: bool, message: str, code: int) -> int:
    if rank0:
        print(f"vitlab train: {message}", file=sys.stderr)
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a model on an image folder")
    p.add_argument("--config", required=True, help="preset name (paper-pretrain, paper-finetune, small-scratch, demo) "
                                                   "or a YAML/JSON/Python config file")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (or test/)")
    p.add_argument("--out", required=True, help="run directory (checkpoint, logs, final weights)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    mode.add_argument("--overwrite", action="store_true",
                      help="start a new run in an --out that holds another run's checkpoint or weights")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    p.set_defaults(func=run)
