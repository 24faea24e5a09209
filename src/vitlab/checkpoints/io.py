"""File plumbing shared by the formats: safe reads that turn library errors into one clear message naming the
file, and atomic writes (temp file + rename) so a failed save never destroys an existing checkpoint."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path in the destination folder, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def read_torch_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.bin`` state dict through ``torch.load(weights_only=True)``, which refuses arbitrary objects."""
    import pickle

    path = _require_file(path)
    try:
        try:
            # Memory-mapped: the tensors are read from the page cache as they are used, not copied up front.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) torch format
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read as a weights-only torch file ({first}); vitlab never runs "
                              f"torch.load with weights_only=False") from None
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
