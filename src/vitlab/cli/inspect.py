"""``vitlab inspect``: the paper's analyses (Fig. 6, Fig. 7, Appendix D.7-D.8) of any checkpoint, as PNG + JSON.

Loads the checkpoint as every command does (:func:`vitlab.cli.common.load_checkpoint`: any format ``vitlab.load``
reads, the position embedding resampled if another resolution is asked for), reads and resizes the images, and
calls :func:`vitlab.analysis.inspect_model`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from vitlab.cli.common import UsageError, add_checkpoint_args, load_checkpoint, output_dir

log = logging.getLogger(__name__)

DEFAULT_NUM_IMAGES = 128  # the paper averages the attention distance over 128 images


def inspect_checkpoint(model: nn.Module, images: str | Path, out: str | Path, *, num_images: int = DEFAULT_NUM_IMAGES,
                       normalize: str = "auto", checkpoint: str | Path | None = None, meta: dict | None = None,
                       **kwargs) -> dict:
    """Read up to ``num_images`` images from ``images``, scale them as the model expects (``normalize="auto"``:
    what ``checkpoint`` records, else the official [-1, 1]), and run every analysis."""
    from vitlab.analysis.images import input_normalization, list_images, read_images
    from vitlab.analysis.report import inspect_model

    if normalize == "auto":
        mean, std, source = input_normalization(model, checkpoint)
    else:
        mean, std, source = input_normalization(nn.Module(), default=normalize)
    paths = list_images(images, num_images)
    x, display = read_images(paths, model.config.image_hw, mean, std)
    root = Path(images)
    names = [str(p.relative_to(root)) if root.is_dir() else p.name for p in paths]
    meta = {**(meta or {}), "normalization": {"mean": list(mean), "std": list(std), "source": source},
            "image_dir": str(images)}
    return inspect_model(model, x, display, out, names=names, meta=meta, **kwargs)


def run(args: argparse.Namespace) -> int:
    from vitlab.data import sample_root

    if args.num_images < 1:
        raise UsageError("--num-images must be at least 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    out = output_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = Path(args.images) if args.images else sample_root() / "test"
    model, _ = load_checkpoint(args)  # at --image-size, the position embedding resampled
    try:
        layers = None if not args.layer else [layer - 1 for layer in args.layer]
        head = None if args.head is None else args.head - 1
        summary = inspect_checkpoint(
            model, images, out, num_images=args.num_images, normalize=args.normalize, layers=layers,
            head=head, query=args.query, k=args.k, batch_size=args.batch_size, num_show=args.num_show,
            checkpoint=args.checkpoint, meta={"checkpoint": str(args.checkpoint)},
        )
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    dist = summary["attention_distance"]["per_layer_mean"]
    print(f"wrote {len(summary['files']) + 1} files to {out} ({summary['images']} images, "
          f"{summary['seconds']:.1f} s)")
    if "pos_embed" in summary:
        print(f"position embedding: Spearman(similarity, grid distance) = {summary['pos_embed']['spearman']:.3f}")
    print("mean attention distance per layer (px, mean over heads): " + ", ".join(f"{d:.1f}" for d in dist))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="the paper's analyses (filters, position embedding, attention distance, rollout) as PNG+JSON",
        description="Write the paper's Fig. 6/7 analyses of CHECKPOINT as PNG figures and JSON numbers.")
    add_checkpoint_args(p, image_size="analyse at this resolution; the position embedding is resampled if it "
                                      "differs")
    p.add_argument("--out", required=True, help="output folder for the PNG and JSON files")
    p.add_argument("--images", default=None,
                   help="image file or folder (searched recursively); default: the bundled CIFAR-10 sample's test set")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help=f"use at most this many images, spread over the sorted files (default {DEFAULT_NUM_IMAGES})")
    p.add_argument("--normalize", default="auto", choices=["auto", "official", "imagenet", "none"],
                   help="input scaling: auto = what the checkpoint records (HF preprocessor_config.json, the "
                        "training run's config.json), else official [-1, 1]; none = [0, 1] (default auto)")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="layer (1-based) to show in the raw attention figure; repeat for several (default: all)")
    p.add_argument("--head", type=int, default=None, help="head (1-based) for the raw attention figure "
                                                          "(default: mean over heads)")
    p.add_argument("--query", default=None, help="query token of the raw attention figure: 'cls' or 'row,col' "
                                                 "(0-based patch; default: class token, or the centre patch for GAP)")
    p.add_argument("--k", type=int, default=28, help="principal components of the embedding filters (default 28)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--num-show", type=int, default=8, help="images shown in the rollout/attention figures (default 8)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)
