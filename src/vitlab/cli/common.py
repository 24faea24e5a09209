"""What the commands share: the user-error exception that :func:`vitlab.cli.main` turns into one line on stderr
and exit code 2 (a bug still shows its traceback), checks of an output place made before any work is done, and
one way to name and load a checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vitlab.io import OutputPlaceError, check_output_dir, check_output_file

if TYPE_CHECKING:
    from torch import nn

# vitlab.checkpoints.api.FORMATS, written out so that building the parser imports nothing heavy.
FORMATS = ("vitlab", "npz", "timm", "hf")


class UsageError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit code 2."""


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder the command may create or write into; else a :class:`UsageError` naming ``flag``."""
    try:
        return check_output_dir(path, flag)
    except OutputPlaceError as e:
        raise UsageError(str(e)) from None


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a file the command may create or replace; else a :class:`UsageError` naming ``flag``."""
    try:
        return check_output_file(path, flag)
    except OutputPlaceError as e:
        raise UsageError(str(e)) from None


def add_checkpoint_args(p: argparse.ArgumentParser, *, model: bool = True,
                        image_size: str | None = "use the model at this input size: the position embedding is "
                                                 "resampled as the official code does") -> None:
    """The checkpoint argument and the options that say how to read it, the same in every command."""
    p.add_argument("checkpoint", help="checkpoint file, directory or hf-hub:REPO (any format vitlab.load reads)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="checkpoint format when the file does not say it (.npz, vitlab metadata, config.json)")
    if model:
        p.add_argument("--model", default=None,
                       help="architecture where the file cannot tell it, e.g. ViT-B/16 (bare timm state dicts)")
    if image_size:
        p.add_argument("--image-size", type=int, default=None, help=image_size)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision`` (``vitlab.precision``'s vocabulary), the same in every command that runs a model."""
    from vitlab.precision import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): bf16 where the device computes it natively (CUDA, AVX512-BF16/AMX CPUs), "
                        "else fp32")


def load_checkpoint(args: argparse.Namespace) -> tuple[nn.Module, list[str] | None]:
    """The model of ``args.checkpoint`` (with ``--format``, ``--model``, ``--image-size`` where the command has
    them) in eval mode, and its class names; a :class:`UsageError` naming the file when it cannot be read."""
    from vitlab.train.inference import load_for_inference

    image_size = getattr(args, "image_size", None)
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be positive, got {image_size}")
    try:
        return load_for_inference(args.checkpoint, format=args.format, model=getattr(args, "model", None),
                                  image_size=image_size)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise UsageError(f"cannot load {args.checkpoint}: {e}") from None
