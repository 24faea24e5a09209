"""``vitlab export CHECKPOINT --to onnx``: a checkpoint as an ONNX file with a dynamic batch dimension, checked
against torch with onnxruntime. A thin layer over :mod:`vitlab.bench.onnx`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlab.cli.common import UsageError, add_checkpoint_args, load_checkpoint, output_file


def run(args: argparse.Namespace) -> int:
    from vitlab.bench.onnx import DEFAULT_TOLERANCE, check_onnx, export_onnx

    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else source.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out} must end in .onnx")
    if source.exists() and out.resolve() == source.resolve():
        raise UsageError(f"--out {out} would overwrite the checkpoint")
    output_file(out)
    model, _ = load_checkpoint(args)
    export_onnx(model, out, opset=args.opset)
    print(f"wrote {out}")
    if not args.no_check:
        try:
            diff = check_onnx(model, out, tolerance=args.tolerance or DEFAULT_TOLERANCE)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f"onnxruntime matches torch: max |difference| {diff:.2e} (batch 1 and 3)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (dynamic batch), checked with onnxruntime")
    add_checkpoint_args(p, image_size="export at this input size (the position embedding is resampled)")
    p.add_argument("--to", choices=["onnx"], required=True, help="target format")
    p.add_argument("--out", default=None, help="output file (default: CHECKPOINT with .onnx suffix)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit difference| allowed (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run)
