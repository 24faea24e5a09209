"""``vitlab convert SRC DST --from FORMAT --to FORMAT``: move weights between the official ``.npz``, timm,
Hugging Face and vitlab's own format (a thin layer over :func:`vitlab.checkpoints.convert`)."""

from __future__ import annotations

import argparse
import json
import logging

from vitlab.cli.common import UsageError, output_dir, output_file

FORMATS = ("vitlab", "npz", "timm", "hf")


def run(args: argparse.Namespace) -> int:
    from vitlab.checkpoints import CheckpointError, convert

    model = args.model
    if args.model_json:
        try:
            model = json.loads(args.model_json)
        except json.JSONDecodeError as e:
            raise UsageError(f"--model-json is not valid JSON ({e})") from None
        if not isinstance(model, dict):
            raise UsageError("--model-json must be a JSON object of config fields")
    image_size = None
    if args.image_size and len(args.image_size) > 2:
        raise UsageError(f"--image-size takes N or H W, got {args.image_size}")
    if args.image_size:
        image_size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    # The destination is a folder for Hugging Face, a file otherwise: checked before the (long) read.
    (output_dir if args.to_format == "hf" else output_file)(args.dst, "destination")
    try:
        out = convert(args.src, args.dst, src_format=args.from_format, dst_format=args.to_format, model=model,
                      image_size=image_size, num_classes=args.num_classes, progress=not args.quiet)
    except (CheckpointError, ValueError) as e:
        logging.getLogger("vitlab").debug("conversion failed", exc_info=True)
        raise UsageError(str(e)) from None
    print(f"wrote {out} ({args.to_format})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints between the npz, timm, hf and vitlab formats",
        description="Load SRC strictly and write it to DST. SRC may be a file, an HF/timm directory or "
                    "hf-hub:<owner>/<name>. Example: vitlab convert ViT-B_16.npz vit_b16.safetensors --from npz "
                    "--to vitlab",
    )
    p.add_argument("src", help="source file, directory or hf-hub:<repo>")
    p.add_argument("dst", help="destination file (a directory for --to hf)")
    p.add_argument("--from", dest="from_format", choices=FORMATS, default=None,
                   help="source format (default: from the file itself: .npz, vitlab metadata, config.json)")
    p.add_argument("--to", dest="to_format", choices=FORMATS, default="vitlab", help="destination format")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--model", default=None,
                      help="architecture where the shapes cannot tell it, e.g. ViT-B/16 (needed for bare timm files)")
    spec.add_argument("--model-json", default=None,
                      help='config fields on top of the shapes, as JSON, e.g. \'{"num_heads": 12}\'')
    p.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="resize the position embedding to this input size (N or H W), as the official code")
    p.add_argument("--num-classes", type=int, default=None, help="replace the head by a zero-initialised one")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
