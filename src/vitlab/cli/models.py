"""``vitlab models``: the named models with their parameter counts."""

from __future__ import annotations

import argparse
import json

from vitlab.model import count_parameters, list_models


def model_table(num_classes: int = 1000) -> list[dict]:
    rows = []
    for name in list_models():
        rows.append({"name": name, "params": count_parameters(name, num_classes=num_classes)})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_table(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'model':<16} {'parameters':>14}")
        for row in rows:
            print(f"{row['name']:<16} {row['params']:>14,}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list named models with parameter counts")
    p.add_argument("--num-classes", type=int, default=1000, help="head size used for the count (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
