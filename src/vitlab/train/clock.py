"""The run clock: how far a run is, and what follows from it.

A run's length is counted in optimiser steps, or (``budget_minutes``) in wall-clock seconds of the training loop.
From the share of the run done follow the training resolution (``TrainConfig.resolution_stages``), whether
mixup/cutmix is still on (``mix_off_fraction``), the learning-rate schedule's length (in budget mode re-estimated
from the measured step rate, so the schedule ends when the budget does) and the stop.

Under torchrun every process must take the same decisions at the same step, or the gradient all-reduce would
pair different steps. With a budget the processes' clocks differ, so rank 0's reading is broadcast each time the
clock is read and every rank decides from that one number.
"""

from __future__ import annotations

import time

from vitlab.train.config import TrainConfig
from vitlab.train.distributed import Dist

# Budget mode re-estimates the schedule's length only after the step rate has been measured over this many steps,
# starting this many steps after the start or a change of resolution (warm-up, torch.compile's first steps).
RATE_STEPS = 10
RATE_WARMUP_STEPS = 10
RESIZE_WARMUP_STEPS = 3


class RunClock:
    """The position of a run in steps and (with a budget) seconds, and the decisions that depend on it.

    ``total_steps``: the run's length in steps (with a budget, an upper bound that the estimate never exceeds).
    ``elapsed``: seconds of training already done (a resumed run's checkpoint holds them).
    """

    def __init__(self, config: TrainConfig, *, total_steps: int, start_step: int = 0, elapsed: float = 0.0,
                 d: Dist | None = None) -> None:
        self.budget_s = config.budget_minutes * 60 if config.budget_minutes else None
        self.stages = config.resolution_stages()
        self.image_size = config.image_size
        self.mix_until = 1.0 - config.mix_off_fraction
        self.total_steps = self.step_cap = total_steps
        self.start_step = start_step
        self.d = d or Dist()
        self._start = time.perf_counter() - elapsed
        self._size: int | None = None
        self._mark_at = start_step + RATE_WARMUP_STEPS
        self._mark = (start_step, elapsed)  # (step, elapsed seconds) from which the step rate is measured
        self.mixing = self.fraction(start_step, self.elapsed() if self.budget_s is not None else 0.0) < self.mix_until
        self.done = False

    def elapsed(self) -> float:
        """Seconds of training so far, resumed runs included; rank 0's reading on every rank in budget mode."""
        local = time.perf_counter() - self._start
        return self.d.rank0_seconds(local) if self.budget_s is not None else local

    def fraction(self, step: int, elapsed: float) -> float:
        """The share of the run done: of the budget, or of the steps."""
        return elapsed / self.budget_s if self.budget_s is not None else step / self.total_steps

    def size_at(self, fraction: float) -> int:
        """The training resolution at ``fraction`` of the run."""
        return next((size for size, end in self.stages if fraction < end), self.image_size)

    def begin_step(self, step: int) -> int:
        """Called before optimiser step ``step``: returns its training resolution and, in budget mode, updates
        ``total_steps`` from the step rate."""
        elapsed = self.elapsed() if self.budget_s is not None else 0.0
        size = self.size_at(self.fraction(step, elapsed))
        if self._size is not None and size != self._size:
            self._mark_at = step + RESIZE_WARMUP_STEPS  # measure the new resolution's rate, after recompiling
        self._size = size
        if self.budget_s is not None:
            if step == self._mark_at:
                self._mark = (step, elapsed)
            if step - self.start_step >= 2 * RATE_STEPS and step - self._mark[0] >= RATE_STEPS:
                self.total_steps = min(self.step_cap, self.budget_steps(step, elapsed, size))
        return size

    def end_step(self, step: int) -> None:
        """Called once ``step`` optimiser steps are done: sets ``mixing`` (for the next batch drawn) and ``done``."""
        elapsed = self.elapsed() if self.budget_s is not None else 0.0
        self.mixing = self.fraction(step, elapsed) < self.mix_until
        self.done = step >= self.total_steps or (self.budget_s is not None and elapsed >= self.budget_s)

    def budget_steps(self, step: int, elapsed: float, size: int) -> int:
        """The schedule's length re-estimated at ``step`` (``elapsed`` seconds in, training at ``size``): the time
        left at each resolution of the stages runs at the step rate measured since the last mark, scaled by the
        token ratio (a step's time grows about with its tokens)."""
        rate = (step - self._mark[0]) / max(elapsed - self._mark[1], 1e-9)
        future, begin = 0.0, 0.0
        for stage_size, end in self.stages:
            left = max(0.0, end * self.budget_s - max(begin * self.budget_s, elapsed))
            future += rate * left * (size / stage_size) ** 2
            begin = end
        return max(step + 1, round(step + future))
