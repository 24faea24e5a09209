"""File plumbing shared by the formats: safe reads that turn library errors into one clear message naming the
file. (Writes go through :func:`vitlab.io.atomic_write`, so a failed save never destroys an existing checkpoint.)"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vitlab.checkpoints.strict import CheckpointError


_PROGRESS: contextvars.ContextVar[Any] = contextvars.ContextVar("vitlab_checkpoint_progress", default=None)


@contextlib.contextmanager
def read_progress(source: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """A tqdm bar, in bytes, advanced by every tensor the readers below take from ``source`` (a file, or the
    weights inside a directory); a no-op when disabled."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    path = Path(str(source))
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")] if path.is_dir() else [path]
    total = sum(f.stat().st_size for f in files if f.exists()) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {path.name}") as bar:
        token = _PROGRESS.set(bar)
        try:
            yield
            if total:
                bar.update(max(total - bar.n, 0))
        finally:
            _PROGRESS.reset(token)


def report_read(nbytes: int) -> None:
    """Advance the progress bar of :func:`read_progress`, if one is active."""
    bar = _PROGRESS.get()
    if bar is not None:
        bar.update(nbytes)


def _not_safetensors(path: Path, head: bytes, why: str) -> CheckpointError:
    # A raw pickle starts with PROTO (0x80, 2..5); torch.save writes a zip archive holding one.
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head[:4] == b"PK\x03\x04":
        return CheckpointError(f"{path}: is a pickle / torch.save archive, not safetensors; vitlab never unpickles "
                               f"weights it was told are safetensors (use format='timm' for a .pth state dict)")
    return CheckpointError(f"{path}: not a valid safetensors file ({why})")


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a weights file")
    return path


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone."""
    path = _require_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or empty file ({len(head)} bytes), expected a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8 or n > 100_000_000:
            raise _not_safetensors(path, head, f"header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _not_safetensors(path, head, "unreadable JSON header") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, head, "header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _not_safetensors(path, head, "malformed tensor entries in the header") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, the header describes {8 + n + end})")
    return dict(header.get("__metadata__") or {})


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged file raises :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError, safe_open

    safetensors_metadata(path)  # validates header and length first, with a readable message
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
                report_read(out[key].nbytes)
        return out
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None


def _torch_load_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words: torch's own message suggests retrying
    with ``weights_only=False``, which would run whatever code the file holds."""
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, re.S)
    if unpickler:
        detail = " ".join(unpickler.group(1).split())
        found = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
        if found:
            return f"it holds a {found.group(1)} object, which only a full unpickler (running code) can build"
        return f"its pickle is not one of tensors and containers ({detail.split('. ')[0].rstrip('.')})"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "a damaged or truncated torch.save archive"
    return f"{type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else 'unreadable'}"


def read_torch_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.bin`` state dict through ``torch.load(weights_only=True)``, which refuses arbitrary objects."""
    import pickle

    path = _require_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; before torch 1.6 it wrote a pickle stream (PROTO opcode first).
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a torch.save file (neither a zip archive nor a pickle stream); "
                              f"damaged, or another format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols of refused files
            try:
                # Memory-mapped: the tensors are read from the page cache as they are used, not copied up front.
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) torch format
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read as a weights-only torch file ({_torch_load_reason(e)}); vitlab "
                              f"never unpickles anything but tensors and containers") from None
    # Training checkpoints commonly nest the weights under one of these keys.
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare state dict from ``.safetensors`` or a torch file (by extension)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return read_torch_weights(path)
    raise CheckpointError(f"{path}: unknown weights extension {path.suffix!r}; expected .safetensors, .pth, .pt "
                          f"or .bin")
