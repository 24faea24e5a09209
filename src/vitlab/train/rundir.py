"""The run folder: one owner at a time, and every file a training run writes there.

::

    RUN/run.lock           locked (``flock``) by the process training into RUN; says which (pid, host, start)
    RUN/config.json        the resolved TrainConfig
    RUN/checkpoint.pt      the resumable state, every ``checkpoint_every`` steps, at evaluations, stops and the end
    RUN/metrics.jsonl      one JSON line per logged step and per evaluation
    RUN/run.log            the unreadable images that were skipped
    RUN/model.safetensors  the final weights (EMA applied), with ``classes.json``
    RUN/best.safetensors   with ``keep_best``: the weights of the best evaluation, with ``best.json``
    RUN/final.json         the final metrics; a run whose checkpoint is at final.json's step is finished
    RUN/tensorboard/       with ``tensorboard=true``

The lock is an OS file lock, held while the process lives: a crash or kill releases it with the process, so no
stale lock outlives its run. Under torchrun rank 0 owns the folder and writes every file; the methods that write
do nothing on the other ranks.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from torch import nn

from vitlab.io import check_output_dir, write_json, write_text
from vitlab.train.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
BEST_JSON = "best.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
CONFIG = "config.json"
CLASSES = "classes.json"
RUN_LOG = "run.log"
LOCK = "run.lock"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock; the message names it."""


class RunFolder:
    """A training run's folder (see the module docstring). ``main``: this process writes (rank 0)."""

    def __init__(self, path: str | os.PathLike, *, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self._lock_fd: int | None = None
        self._created = False

    # ------------------------------------------------------------------------------------------- ownership
    def check_place(self) -> None:
        """Refuse a file, or a place that cannot be written, before any work is done."""
        check_output_dir(self.path, "--out")

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Create the folder and take its lock (:class:`RunFolderBusy` when another process has it); without
        ``resume``, refuse a folder holding another run's checkpoint or weights unless ``overwrite``."""
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if resume or overwrite:
                return
            if (self.path / CHECKPOINT).exists():
                raise FileExistsError(f"{self.path} already holds a training checkpoint; pass --resume to continue "
                                      f"it, --overwrite to start a new run there, or choose another --out")
            if (self.path / WEIGHTS).exists():
                raise FileExistsError(f"{self.path} already holds {WEIGHTS}; pass --overwrite to replace it or "
                                      f"choose another --out")
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        import fcntl

        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = path.read_text().strip() if path.exists() else ""
                raise RunFolderBusy(f"{self.path} is in use by another training run ({holder or 'holder unknown'}); "
                                    f"wait for it to end or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its owner removed while we waited to open it
                self._lock_fd = fd
                return
            os.close(fd)

    def start(self, *, resume: bool, overwrite: bool) -> None:
        """Write who holds the lock into it and, for a new run over an old one (``overwrite``), remove the files
        that would make the folder look like the old run (its checkpoint, final and best results, log)."""
        if self._lock_fd is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode()
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, text, 0)
        if self.main and overwrite and not resume:
            for name in (CHECKPOINT, FINAL, BEST, BEST_JSON, RUN_LOG):
                (self.path / name).unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock back; a folder this process created and left holding only the lock file is removed."""
        if self._lock_fd is None:
            return
        import fcntl

        fd, self._lock_fd = self._lock_fd, None
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
            self.path.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # ------------------------------------------------------------------------------------------ reading
    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.path / CHECKPOINT)

    def finished(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The final metrics of a run that has finished at the checkpoint's step, else None."""
        try:
            result = json.loads((self.path / FINAL).read_text())
        except (OSError, ValueError):
            return None
        return result if isinstance(result, dict) and result.get("step") == state.get("step") else None

    # ------------------------------------------------------------------------------------------ writing
    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / CONFIG, config)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.main:
            save_checkpoint(self.path / CHECKPOINT, state)

    def save_weights(self, model: nn.Module, classes: list[str], name: str = WEIGHTS) -> Path:
        """``vitlab.save`` (native safetensors, class names in its metadata) plus ``classes.json`` beside it."""
        import vitlab

        path = self.path / name
        if self.main:
            vitlab.save(model, path, labels=classes)
            write_json(self.path / CLASSES, classes, indent=None)
        return path

    def write_best(self, record: dict[str, Any]) -> None:
        if self.main:
            write_json(self.path / BEST_JSON, record)

    def write_final(self, result: dict[str, Any]) -> None:
        """``final.json``, strict JSON (a NaN becomes null)."""
        if self.main:
            write_json(self.path / FINAL, {k: None if isinstance(v, float) and not math.isfinite(v) else v
                                           for k, v in result.items()})

    def log_skipped(self, lines: list[str]) -> None:
        if self.main and lines:
            with open(self.path / RUN_LOG, "a") as f:
                f.writelines(line + "\n" for line in lines)


class MetricsLog:
    """JSON-lines metrics (``RUN_DIR/metrics.jsonl``) and, optionally, TensorBoard event files."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: those steps are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=true needs the tensorboard package: pip install vitlab[tensorboard]") \
                    from e
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
