"""Writing files so that a crash never leaves a half-written one: the one atomic write every vitlab module uses
(checkpoints, training runs, figures, result JSON).

The content goes to a temporary file in the destination folder, is flushed to disk, then renamed over the
destination: the rename is atomic within one file system, so readers see the old file or the new one, never a
mixture, and a kill at any moment leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``; returns ``path``.

    Creates the parent folder. On any failure (an exception in ``write``, a signal) the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as JSON (a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


class OutputPlaceError(ValueError):
    """An output path that cannot be written: a file where a folder is expected (or the reverse), or a folder
    without write permission. Raised before any work is done."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable(folder: Path, what: str) -> None:
    """``folder`` (an existing directory) accepts new files: tried with a real file, since permission bits alone
    do not tell (a read-only mount; root, who ignores them)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPlaceError(f"{what}: cannot write in {folder} (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitlab-write-check.", dir=folder)
    except OSError as e:
        raise OutputPlaceError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, name: str = "output folder") -> Path:
    """``path`` as a folder that can be created or written into, else an :class:`OutputPlaceError` naming ``name``
    (e.g. ``"--out"``) and the path. Creates nothing."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise OutputPlaceError(f"{name} {path} {what}; expected a folder")
    _check_writable(existing, f"{name} {path}")
    return path


def check_output_file(path: str | os.PathLike, name: str = "output file") -> Path:
    """``path`` as a file that can be created or replaced, else an :class:`OutputPlaceError` naming ``name`` and
    the path. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputPlaceError(f"{name} {path} is a folder; expected a file path")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputPlaceError(f"{name} {path} cannot be created: {existing} is a file, not a folder")
    _check_writable(existing, f"{name} {path}")
    return path
