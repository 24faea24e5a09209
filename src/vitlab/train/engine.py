"""The training loop: from-scratch training and fine-tuning (paper Sec. 4.1 and Appendix B), on one process or
many (torchrun: DDP, or FSDP2 ``fully_shard``).

It reads top to bottom: :func:`train` -> :func:`fit` (check the inputs, claim the run folder, set the run up, loop,
finish) -> :func:`train_loop` (batches, evaluations, checkpoints, stop signals) -> :func:`training_step` (one
optimiser step at the run clock's resolution and learning rate) -> :func:`train_step` (forward, backward, clip,
update). The pieces live in their own modules: the processes (``distributed``), the data (``data``), the model and
the optimiser (``model``, ``optim``), the run folder (``rundir``: lock, checkpoints, metrics, results) and the run
clock (``clock``: budget, resolution and mixing schedule).

Everything random in a step (batch order, augmentation, dropout, stochastic depth) is seeded from
``(seed, step)``; together with the checkpointed optimizer, EMA and RNG states this makes ``resume=True`` after a
kill end with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vitlab.data.folder import BadSample
from vitlab.data.images import BadImageError
from vitlab.data.loaders import derive_seed
from vitlab.data.transforms import GLOBAL_RNG_LOCK
from vitlab.model import VisionTransformer
from vitlab.precision import autocast, hardware, resolve
from vitlab.train.checkpoint import rng_states, set_rng_states
from vitlab.train.clock import RunClock
from vitlab.train.config import RESUMABLE_CHANGES, TrainConfig, config_diff
from vitlab.train.data import (BatchStream, RunData, TrainingFolder, batch_augment, build_data,
                               check_training_folder, fingerprint_diff, image_transform)
from vitlab.train.distributed import Dist, StopSignals, setup_distributed
from vitlab.train.evaluate import evaluate
from vitlab.train.model import (build_model, data_parallel, full_state, load_full_state, shard, unwrap, uses_fsdp,
                                weights_copy)
from vitlab.train.optim import EMA, build_optimizer, param_groups
from vitlab.train.rundir import BEST, CHECKPOINT, WEIGHTS, MetricsLog, RunFolder, RunFolderBusy
from vitlab.train.schedule import lr_at

log = logging.getLogger(__name__)

# Names other modules and scripts take from here (the loop's building blocks).
__all__ = ["EMA", "RESUMABLE_CHANGES", "Dist", "NonFiniteLossError", "RunFolderBusy", "batch_augment",
           "build_data", "build_model", "build_optimizer", "fit", "image_transform", "loss_fn", "param_groups",
           "train", "train_loop", "train_step", "training_step"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# ------------------------------------------------------------------------------------------------ entry points
def train(config: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Train (or fine-tune, with ``config.init``) on ``data_dir`` (``train/`` and ``val/`` or ``test/``).

    ``out_dir`` receives ``checkpoint.pt`` (resumable), ``config.json``, ``metrics.jsonl``, ``run.log`` lines for
    skipped images, ``model.safetensors`` + ``classes.json`` and ``final.json`` (see :mod:`vitlab.train.rundir`).
    Returns the final metrics (``top1`` etc. on the validation split, when there is one, plus throughput).

    One process at a time trains into ``out_dir`` (a second gets :class:`RunFolderBusy`). A folder holding another
    run's checkpoint or weights is refused unless ``resume`` (continue it; a finished run is left as it is and its
    final metrics returned, with ``already_finished``) or ``overwrite`` (start a new run there). SIGTERM and
    SIGINT stop the loop with a checkpoint (``interrupted`` and ``signal`` in the result). Under torchrun every
    process calls this; rank 0 writes the files.
    """
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return fit(config, data_dir, Path(out_dir), resume=resume, overwrite=overwrite, progress=progress)
    finally:
        torch.set_num_threads(threads_before)


def fit(config: TrainConfig, data_dir: str | Path, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None) -> dict[str, Any]:
    """Check the output place and the data (before anything is written), claim the run folder, set the run up
    (or see that it has finished), run the loop and write the results."""
    d = setup_distributed()
    folder = RunFolder(run_dir, main=d.main)
    d.on_main(folder.check_place)
    source = check_training_folder(config, data_dir)
    d.on_main(lambda: folder.claim(resume=resume, overwrite=overwrite))
    try:
        state = resume_state(folder, config, source) if resume else None
        finished = folder.finished(state) if state is not None else None
        if finished is not None:
            return {**finished, "already_finished": True}
        folder.start(resume=resume, overwrite=overwrite)
        show = (sys.stderr.isatty() if progress is None else progress) and d.main
        run = start_run(config, source, folder, d, state, show)
        train_loop(run, show)
        return finish(run)
    finally:
        folder.release()


def resume_state(folder: RunFolder, config: TrainConfig, source: TrainingFolder) -> dict[str, Any]:
    """The checkpoint to resume, refused when the config (beyond :data:`RESUMABLE_CHANGES`) or the training data
    differ from the run's."""
    state = folder.load_checkpoint()
    where = folder.path / CHECKPOINT
    diff = config_diff(state["config"], config.to_dict())
    if diff:
        raise ValueError(f"{where}: --resume with a different config: " + "; ".join(diff))
    saved = state.get("data")  # absent in checkpoints written before the fingerprint was recorded
    diff = fingerprint_diff(saved, source.fingerprint()) if saved is not None else []
    if diff:
        raise ValueError(f"{where}: --resume with different training data in {source.train_dir}: " + "; ".join(diff))
    return state


# ------------------------------------------------------------------------------------------------- the run
@dataclass
class LoopStats:
    """Throughput bookkeeping and the last step's numbers."""

    train_time: float = 0.0
    data_time: float = 0.0
    images: int = 0
    loss: float = float("nan")
    grad_norm: float | None = None

    @property
    def img_per_s(self) -> float:
        return self.images / max(self.train_time + self.data_time, 1e-9)


@dataclass
class Run:
    """What a training run holds while it runs (the loop's state, in one place)."""

    config: TrainConfig
    d: Dist
    folder: RunFolder
    data: RunData
    fingerprint: dict[str, Any]
    model: nn.Module  # the trained module (sharded under FSDP); checkpoints and EMA read it
    train_model: nn.Module  # what the steps call: the model, DDP-wrapped and/or compiled
    eager_model: nn.Module  # train_model without torch.compile (the fallback if compiling fails)
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    clock: RunClock
    metrics: MetricsLog
    spe: int  # optimiser steps per epoch
    warmup: int
    eval_interval: int
    precision: str
    step: int = 0
    compile_pending: bool = False
    skipped: list[BadSample] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": None, "step": None, "since": 0})
    stats: LoopStats = field(default_factory=LoopStats)
    loader_s: float | None = None  # the prefetch threads' busy time, when they ran
    last_eval: dict[str, Any] | None = None
    stopped_early: bool = False
    interrupted: str | None = None  # the name of the signal that stopped the run

    @property
    def num_classes(self) -> int:
        return self.config.num_classes or len(self.data.classes)

    @property
    def fsdp(self) -> bool:
        return uses_fsdp(self.config, self.d)


def start_run(config: TrainConfig, source: TrainingFolder, folder: RunFolder, d: Dist, state: dict[str, Any] | None,
              progress: bool) -> Run:
    """Decode the data, write ``config.json``, build model, optimiser and EMA (restored from ``state`` when
    resuming), and start the run clock."""
    precision = resolve(config.precision, d.device)
    if d.main:
        print(f"vitlab train: precision {precision} ({config.precision} on {hardware(d.device)})", file=sys.stderr,
              flush=True)
    data = build_data(config, source, d, progress)
    spe = data.train.steps_per_epoch(config.batch_size)
    if spe == 0:
        raise ValueError(too_few_images(source, data, config.batch_size))
    folder.write_config(config.to_dict())
    model, optimizer, ema = build_trainables(config, config.num_classes or len(data.classes), d, state)
    step = int(state["step"]) if state is not None else 0
    eager = data_parallel(model, d) if d.world > 1 and not uses_fsdp(config, d) else model
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * spe)
    run = Run(config, d, folder, data, source.fingerprint(), model=model,
              train_model=torch.compile(eager) if config.compile else eager, eager_model=eager,
              optimizer=optimizer, ema=ema, spe=spe, warmup=warmup,
              eval_interval=round(config.eval_every * spe) if config.eval_every > 0 else 0,
              metrics=MetricsLog(folder.path, enabled=d.main, tensorboard=config.tensorboard,
                                 resume_step=step if state is not None else None),
              clock=RunClock(config, total_steps=config.steps or max(1, round(config.epochs * spe)),
                             start_step=step, elapsed=float(state.get("elapsed", 0.0)) if state else 0.0, d=d),
              precision=precision, step=step, compile_pending=config.compile)
    if state is not None:
        run.best = dict(state.get("best") or run.best)
        run.skipped = [BadSample(*b) if isinstance(b, list) else b for b in state.get("bad", [])]
    record_skipped(run, data.bad)
    return run


def build_trainables(config: TrainConfig, num_classes: int, d: Dist,
                     state: dict[str, Any] | None) -> tuple[nn.Module, torch.optim.Optimizer, EMA | None]:
    """Model (sharded under FSDP), optimiser and EMA, restored from ``state`` (with the RNG states) when given."""
    fsdp = uses_fsdp(config, d)
    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(config, num_classes).to(d.device).train()
    if fsdp:
        shard(model)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 and not fsdp else None
    optimizer = build_optimizer(model, config)
    if state is not None:
        load_full_state(model, optimizer, state, fsdp)
        if ema is not None and state.get("ema"):
            ema.state = {k: v.to(d.device) for k, v in state["ema"].items()}
        set_rng_states(state["rng"])
    return model, optimizer, ema


def too_few_images(source: TrainingFolder, data: RunData, batch_size: int) -> str:
    """Why no batch can be formed, with the unreadable files that count against the images."""
    n, bad = data.train.num_samples, data.train_bad
    if n == 0 and bad:
        return (f"{source.train_dir}: no training images: all {len(bad)} files are unreadable (first: {bad[0].path}: "
                f"{bad[0].reason})")
    unreadable = f"; {len(bad)} unreadable file(s) skipped (first: {bad[0].path})" if bad else ""
    return (f"{source.train_dir}: {n} training images are fewer than one batch (batch_size={batch_size})"
            f"{unreadable}")


# -------------------------------------------------------------------------------------------------- the loop
def train_loop(run: Run, progress: bool = False) -> None:
    """Optimiser steps until the schedule (or the budget) ends, patience runs out, or SIGTERM/SIGINT asks to stop
    (then: a checkpoint at that step); evaluations and checkpoints at their intervals in between."""
    config, d = run.config, run.d
    stream = BatchStream(run.data.train, run.spe, run.step, config.batch_size, d)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=run.clock.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
    with StopSignals() as stop, contextlib.closing(stream):
        try:
            while run.step < run.clock.total_steps and not d.any(stop.signum is not None):
                t_data = time.perf_counter()
                x, y, bad = next(stream)
                record_skipped(run, bad)
                run.stats.data_time += time.perf_counter() - t_data
                training_step(run, x, y)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{run.stats.loss:.3f}", img_s=f"{run.stats.img_per_s:.0f}")
                if run.clock.done:
                    break
                if run.eval_interval and run.step % run.eval_interval == 0:
                    if evaluate_and_track(run):
                        break
                elif run.step % config.checkpoint_every == 0:
                    save_checkpoint(run)
            if d.any(stop.signum is not None):
                run.interrupted = stop.name or "a signal on another process"
                save_checkpoint(run)
        finally:
            if bar is not None:
                bar.close()
    run.loader_s = stream.busy_s if stream.prefetch else None


def training_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimiser step on this process's part of the global batch, at the resolution and learning rate the
    run clock gives for the step; then the clock moves on and the step's metrics are logged."""
    config, d = run.config, run.d
    t0 = time.perf_counter()
    size = run.clock.begin_step(run.step)
    lr = lr_at(run.step, total_steps=run.clock.total_steps, peak=config.lr, warmup_steps=run.warmup,
               kind=config.schedule, min_lr=config.min_lr)
    micro = config.batch_size // config.accum_steps // d.world
    parts = list(zip(x.split(micro), y.split(micro))) if len(y) else []
    if parts:
        run.stats.loss, run.stats.grad_norm = optimizer_step(run, parts, lr, size)
    run.step += 1
    run.clock.end_step(run.step)
    run.data.train.mixing = run.clock.mixing  # before the next batch is drawn
    run.stats.train_time += time.perf_counter() - t0
    run.stats.images += len(y) * d.world
    if run.step % config.log_every == 0 or run.step == run.clock.total_steps:
        run.metrics.write({"step": run.step, "epoch": round(run.step / run.spe, 4), "loss": run.stats.loss, "lr": lr,
                           "grad_norm": run.stats.grad_norm if parts else None,
                           "img_per_s": round(run.stats.img_per_s, 1), "time": round(time.time(), 3)})


def optimizer_step(run: Run, parts: list, lr: float, size: int) -> tuple[float, float]:
    """:func:`train_step` on the run's model, falling back to eager mode if torch.compile fails on the first
    compiled step; then the EMA update."""
    kwargs = dict(config=run.config, device=run.d.device, step=run.step, rank=run.d.rank, lr=lr, image_size=size)
    try:
        result = train_step(run.train_model, run.optimizer, parts, **kwargs)
    except NonFiniteLossError:
        raise
    except Exception as e:  # noqa: BLE001 - only the first compiled step may fall back
        if not run.compile_pending:
            raise
        # No C++ toolchain, an unsupported op...: train eagerly rather than not at all.
        log.warning("torch.compile failed (%s: %s); continuing without it", type(e).__name__, e)
        run.optimizer.zero_grad(set_to_none=True)
        run.train_model = run.eager_model
        result = train_step(run.train_model, run.optimizer, parts, **kwargs)
    run.compile_pending = False
    if run.ema is not None:
        run.ema.update(run.model)
    return result


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices or soft (mixup/cutmix) targets, with label smoothing."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[tuple[torch.Tensor, Any]],
               *, config: TrainConfig, device: torch.device, step: int, rank: int, lr: float,
               image_size: int | None = None) -> tuple[float, float]:
    """One optimiser step over ``micro_batches`` (gradient accumulation). Returns (mean loss, gradient norm).

    ``image_size`` other than the batches' resizes them first (antialiased) and lets the model sample its
    position embedding at the smaller grid.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = sum(len(x) for x, _ in micro_batches)
    loss_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        # Dropout and stochastic depth draw from the global RNG: seed it per (step, micro-batch, rank) so a resumed
        # run draws exactly what the uninterrupted one did.
        with GLOBAL_RNG_LOCK:  # not while a loader thread has the generator seeded for its transforms
            torch.manual_seed(derive_seed(config.seed, step, i, rank, 5))
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            x = x.to(device, non_blocking=True)
            kwargs = {}
            if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
                if isinstance(unwrap(model), VisionTransformer):
                    kwargs["interpolate_pos_embed"] = True
            with autocast(config.precision, device):
                logits = model(x, **kwargs)
            loss = loss_fn(logits, y.to(device, non_blocking=True), config.label_smoothing)
            (loss * (len(x) / total)).backward()
        loss_sum += loss.item() * len(x)
    mean_loss = loss_sum / total
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite training loss ({mean_loss}) at step {step}; stopped without "
                                 f"updating the weights (the last good checkpoint is kept)")
    if config.grad_clip:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
    else:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, norm


# -------------------------------------------------------------------------------- evaluation and checkpoints
def evaluate_run(run: Run) -> dict[str, Any] | None:
    """The current weights (EMA applied) on the validation split, when there is one."""
    if run.data.val is None:
        return None
    model = unwrap(run.model)
    if run.ema is not None:
        model = copy.deepcopy(model)
        run.ema.copy_to(model)
    return evaluate(model, run.data.val, precision=run.config.precision, device=run.d.device,
                    classes=run.data.classes, num_classes=run.num_classes)


def log_evaluation(run: Run, evaluation: dict[str, Any]) -> None:
    run.metrics.write({"step": run.step, "epoch": round(run.step / run.spe, 4), "split": "val",
                       **{k: evaluation[k] for k in ("top1", "top5", "loss")}})


def evaluate_and_track(run: Run) -> bool:
    """An evaluation inside the loop, then a checkpoint; True when early stopping ends the run here."""
    evaluation = evaluate_run(run)
    if evaluation is not None:
        log_evaluation(run, evaluation)
        log.info("step %d: val top1 %.2f%%", run.step, evaluation["top1"])
        run.last_eval = evaluation
        run.stopped_early = track_best(run, evaluation)
    save_checkpoint(run)
    if run.stopped_early:
        log.info("early stopping at step %d: no better validation top-1 in %d evaluations since step %d (%.2f%%)",
                 run.step, run.config.patience, run.best["step"], run.best["top1"])
    return run.stopped_early


def track_best(run: Run, evaluation: dict[str, Any]) -> bool:
    """Record an evaluation for early stopping (``keep_best``: save the weights when it is the best so far); True
    when ``patience`` evaluations in a row have not improved on the best."""
    config, best = run.config, run.best
    if not config.keep_best and config.patience is None:
        return False
    if best["top1"] is None or evaluation["top1"] > best["top1"]:
        best.update(top1=evaluation["top1"], step=run.step, since=0)
        if config.keep_best:
            save_weights(run, BEST)
            run.folder.write_best({"step": run.step, "epoch": run.step / run.spe,
                                   **{k: evaluation[k] for k in ("top1", "top5", "loss")}})
    else:
        best["since"] += 1
    return config.patience is not None and best["since"] >= config.patience


def save_checkpoint(run: Run) -> None:
    """The resumable state (a collective under FSDP; rank 0 writes it)."""
    model_state, optim_state = full_state(run.model, run.optimizer, run.fsdp)
    elapsed = run.clock.elapsed()  # every rank: in budget mode this reads rank 0's clock
    config, step = run.config, run.step
    if not run.d.main:
        return
    run.folder.save_checkpoint({
        "model": model_state, "optimizer": optim_state,
        "scheduler": {"kind": config.schedule, "step": step, "total_steps": run.clock.total_steps,
                      "warmup_steps": run.warmup,
                      "lr": lr_at(max(step - 1, 0), total_steps=run.clock.total_steps, peak=config.lr,
                                  warmup_steps=run.warmup, kind=config.schedule, min_lr=config.min_lr)},
        "ema": run.ema.state if run.ema is not None else {},
        "rng": rng_states(), "elapsed": elapsed, "step": step, "epoch": step / run.spe,
        "config": config.to_dict(), "best": run.best, "data": run.fingerprint,
        "classes": run.data.classes, "bad": [[b.path, b.reason] for b in run.skipped],
    })


def save_weights(run: Run, name: str = WEIGHTS) -> Path:
    """The current weights (EMA applied) as ``vitlab.save`` writes them; a collective under FSDP."""
    weights = weights_copy(run.model, run.optimizer, run.ema, config=run.config, num_classes=run.num_classes,
                           fsdp=run.fsdp, d=run.d)
    if weights is not None:
        run.folder.save_weights(weights, run.data.classes, name)
    return run.folder.path / name


def record_skipped(run: Run, new: list[BadSample]) -> None:
    """Skip unreadable images (count them, list their paths in ``RUN_DIR/run.log``) or stop under ``strict``."""
    if not new:
        return
    if run.config.strict:
        raise BadImageError(new[0].path, new[0].reason + " (--strict: stopping at the first unreadable image)")
    known = {b.path for b in run.skipped}
    fresh = [b for b in new if b.path not in known]
    run.skipped += fresh
    run.folder.log_skipped([f"skipped unreadable image {b.path}: {b.reason}" for b in fresh])
    if fresh and run.d.main:
        log.warning("skipped %d unreadable image(s) (%d so far), listed in %s", len(fresh), len(run.skipped),
                    run.folder.path / "run.log")


# -------------------------------------------------------------------------------------------------- the end
def finish(run: Run) -> dict[str, Any]:
    """The run's summary; unless a signal stopped it: the last checkpoint, the final evaluation, the weights
    (``model.safetensors``) and ``final.json``."""
    result = summary(run)
    if run.interrupted:
        run.metrics.close()
        return result
    save_checkpoint(run)
    final_eval = run.last_eval if run.stopped_early else evaluate_run(run)  # an early stop has just evaluated
    if final_eval is not None:
        result.update({k: final_eval[k] for k in ("top1", "top5", "loss", "n", "per_class")})
        if not run.stopped_early:
            log_evaluation(run, final_eval)
            track_best(run, final_eval)
    if run.config.keep_best or run.config.patience is not None:
        result.update(best=dict(run.best), stopped_early=run.stopped_early)
    weights = save_weights(run, WEIGHTS)
    if run.d.main:
        result["weights"] = str(weights)
        run.folder.write_final(result)
    run.metrics.close()
    run.d.barrier()
    return result


def summary(run: Run) -> dict[str, Any]:
    stats = run.stats
    loop_s = max(stats.train_time + stats.data_time, 1e-9)
    loader_s = run.loader_s if run.loader_s is not None else stats.data_time  # else: the wait for the loader
    result = {"step": run.step, "total_steps": run.clock.total_steps, "epochs": run.step / run.spe,
              "train_loss": stats.loss, "interrupted": run.interrupted is not None,
              "train_img_per_s": stats.images / loop_s if stats.images else None,
              "data_wait_fraction": stats.data_time / loop_s if stats.images else None,
              "loader_img_per_s": stats.images / loader_s if loader_s > 0 else None,
              "train_seconds": stats.train_time + stats.data_time, "in_memory": run.data.in_memory,
              "world_size": run.d.world, "skipped_images": len(run.skipped), "precision": run.precision,
              "hardware": hardware(run.d.device)}
    if run.interrupted:
        result["signal"] = run.interrupted
    return result
