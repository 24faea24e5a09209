"""``vitlab plot RUN_DIR``: loss, accuracy and learning-rate curves of a training run as a PNG."""

from __future__ import annotations

import argparse
import sys

from vitlab.cli.common import output_file


def run(args: argparse.Namespace) -> int:
    from vitlab.train.plot import plot_run

    if args.out:
        output_file(args.out)
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"vitlab plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="draw a training run's curves (loss, accuracy, learning rate) as PNG")
    p.add_argument("run_dir", help="a vitlab train --out directory")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=run)
