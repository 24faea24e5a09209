"""The processes of a run: one, or several launched by torchrun (gloo on CPU, nccl on GPU), and the few things
they must agree on beyond the gradients: rank 0's errors, rank 0's clock, and whether any of them was asked to
stop."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0, which writes the run folder and whose clock is the run's."""
        return self.rank == 0

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Call ``fn`` on rank 0; an exception it raises is raised on every rank (so the others exit instead of
        waiting at the next collective). Returns ``fn``'s value on rank 0, None elsewhere."""
        if self.world == 1:
            return fn()
        value, error = None, None
        if self.main:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
                error = e
        box = [error]
        dist.broadcast_object_list(box, src=0)  # our own processes: pickling here unpickles nothing foreign
        if box[0] is not None:
            raise box[0]
        return value

    def rank0_seconds(self, seconds: float) -> float:
        """Rank 0's value of a clock reading, on every rank (one broadcast)."""
        if self.world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (one all-reduce)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) while the training loop runs: remembered instead of ending the process, so the
    loop stops after the current step with a checkpoint and the run can be resumed. Handlers are installed only in
    the main thread (the only one Python delivers signals to) and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
