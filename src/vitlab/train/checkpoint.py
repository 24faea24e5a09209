"""Resumable training checkpoints, written atomically.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (nothing is unpickled). It is written with :func:`vitlab.io.atomic_write`
(temporary file, flushed, renamed over the previous one): a kill at any moment leaves the last good checkpoint
intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from vitlab.io import atomic_write


def rng_states() -> dict[str, Any]:
    """The RNG states a run consumes: torch CPU (and CUDA when present) and Python's ``random``."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path} (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
        raise ValueError(f"{path}: not a readable vitlab training checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "optimizer", "step", "config"):
        if key not in state:
            raise ValueError(f"{path}: not a vitlab training checkpoint (missing {key!r})")
    return state
