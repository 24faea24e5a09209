"""The training loop: from-scratch training and fine-tuning (paper Sec. 4.1 and Appendix B), on one process or
many (torchrun: DDP, or FSDP2 ``fully_shard``).

Built from small functions: ``build_model``, ``param_groups``, ``train_step``, ``evaluate``, ``save_checkpoint``.
Everything random in a step (batch order, augmentation, dropout, stochastic depth) is seeded from
``(seed, step)``; together with the checkpointed optimizer, EMA and RNG states this makes ``resume=True`` after a
kill end with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from vitlab.data.folder import (BadSample, InMemoryImages, SafeImageFolder, estimate_bytes, load_in_memory, scan,
                                split_dirs)
from vitlab.data.images import BadImageError
from vitlab.data.loaders import FolderBatches, InMemoryBatches, Prefetch, derive_seed
from vitlab.data.transforms import GLOBAL_RNG_LOCK, BatchAugment, resolve_normalize, train_transform
from vitlab.model import VisionTransformer
from vitlab.train.checkpoint import atomic_write, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from vitlab.train.config import TrainConfig
from vitlab.precision import autocast, hardware, resolve
from vitlab.train.evaluate import evaluate, folder_eval_loader
from vitlab.train.schedule import lr_at

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"

# Config keys that may differ between a run and its resumption: they change speed or logging, not the result.
RESUMABLE_CHANGES = {"workers", "threads", "tensorboard", "log_every", "checkpoint_every", "eval_batch_size",
                     "compile", "in_memory", "in_memory_max_mb", "eval_every", "strict"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# ------------------------------------------------------------------------------------------------ process setup
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


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


# ------------------------------------------------------------------------------------------------------ model
def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """A fresh ``create_model`` model, or (``config.init``) a checkpoint loaded at the run's resolution with a
    fresh zero-initialised head of ``num_classes`` outputs (paper Sec. 3.2)."""
    import vitlab

    if not config.init:
        model = vitlab.create_model(config.model, num_classes=num_classes, image_size=config.image_size,
                                    **config.model_overrides)
        if config.attention_init == "mimetic":
            from vitlab.train.init import mimetic_attention_init_

            mimetic_attention_init_(model, generator=torch.Generator().manual_seed(derive_seed(config.seed, 6)))
        return model
    kwargs: dict[str, Any] = {"image_size": config.image_size, "num_classes": num_classes}
    if config.init_format:
        kwargs["format"] = config.init_format
    model = vitlab.load(config.init, drop_pre_logits=config.init_drop_pre_logits, **kwargs)
    if config.model_overrides:
        # Regularisation changes (dropout, drop_path) do not change parameters: rebuild and copy the weights.
        tuned = VisionTransformer(model.config.replace(**config.model_overrides))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    return model


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only: never on norms and biases, and on the position embedding and
    class token only when asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = any(k in name for k in ("pos_embed", "cls_token"))
        if p.ndim >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, config.decay_embeddings)
    # One fused kernel for all parameters instead of torch's per-parameter loop, which on CPU is its default
    # (CIFAR model: ~3 ms of a ~110 ms step). Sharded (FSDP2) parameters keep the default implementation.
    params = [p for group in groups for p in group["params"]]
    fused = {"fused": True} if all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                   for p in params) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, **fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, **fused)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **fused)


class EMA:
    """Exponential moving average of the floating-point state (parameters and buffers), kept in fp32."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        keys = list(self.state)
        torch._foreach_lerp_([self.state[k] for k in keys], [current[k].float() for k in keys], 1.0 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.state})


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    train: InMemoryBatches | FolderBatches
    val: Any  # an iterable of (x, y[, bad]) batches, or None
    classes: list[str]
    bad: list[BadSample]
    in_memory: bool


def _choose_in_memory(config: TrainConfig, train_dir: Path) -> bool:
    if config.in_memory != "auto":
        return bool(config.in_memory)
    samples, _ = scan(train_dir)
    return estimate_bytes(len(samples), config.image_size) <= config.in_memory_max_mb * 2**20


def batch_augment(config: TrainConfig) -> BatchAugment:
    """The config's training augmentation for in-memory uint8 batches (also what the benchmarks time)."""
    return BatchAugment(config.image_size, crop=config.crop, crop_scale=config.crop_scale, crop_pad=config.crop_pad,
                        hflip=config.hflip, randaugment_n=config.randaugment_n, randaugment_m=config.randaugment_m,
                        randaugment_group=config.randaugment_group, normalize=resolve_normalize(config.normalize))


def image_transform(config: TrainConfig):
    """The config's per-image training transform (streamed datasets, DataLoader workers)."""
    return train_transform(config.image_size, crop=config.crop, crop_scale=config.crop_scale,
                           crop_pad=config.crop_pad, hflip=config.hflip, randaugment_n=config.randaugment_n,
                           randaugment_m=config.randaugment_m, normalize=resolve_normalize(config.normalize))


def build_data(config: TrainConfig, data_dir: str | Path, d: Dist, progress: bool) -> RunData:
    train_dir, val_dir = split_dirs(data_dir)
    norm = resolve_normalize(config.normalize)
    in_memory = _choose_in_memory(config, train_dir)
    _, classes = scan(train_dir)
    num_classes = config.num_classes or len(classes)
    mix = dict(mixup=config.mixup, cutmix=config.cutmix, mix_prob=config.mix_prob)
    if in_memory:
        data = load_in_memory(train_dir, config.image_size, strict=config.strict, progress=progress)
        train = InMemoryBatches(data, batch_augment(config), seed=config.seed, num_classes=num_classes, **mix)
        bad = list(data.bad)
        val = None
        if val_dir is not None:
            vdata = load_in_memory(val_dir, config.image_size, classes=classes, strict=config.strict,
                                   progress=progress)
            bad += vdata.bad
            val = MemoryEvalBatches(vdata, config.eval_batch_size, norm)
    else:
        dataset = SafeImageFolder(train_dir, image_transform(config), max_side=config.image_size)
        train = FolderBatches(dataset, seed=config.seed, num_classes=num_classes, workers=config.workers,
                              rank=d.rank, world=d.world, global_batch=config.batch_size, **mix)
        bad = []
        val = None
        if val_dir is not None:
            val = folder_eval_loader(val_dir, config.image_size, normalize=norm,
                                     batch_size=config.eval_batch_size, workers=config.workers, classes=classes)
    return RunData(train, val, classes, bad, in_memory)


class MemoryEvalBatches:
    """Re-iterable evaluation batches over an in-memory split."""

    def __init__(self, data: InMemoryImages, batch_size: int, normalize: str) -> None:
        self.data, self.batch_size, self.normalize = data, batch_size, normalize

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from vitlab.data.transforms import normalize_uint8

        for i in range(0, len(self.data.labels), self.batch_size):
            yield normalize_uint8(self.data.images[i:i + self.batch_size], self.normalize), \
                self.data.labels[i:i + self.batch_size]


# -------------------------------------------------------------------------------------------------- the loop
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
                if isinstance(_unwrap(model), VisionTransformer):
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
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
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


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return ({k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}, optimizer.state_dict())


def _load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
        return
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and json.dumps(saved.get(k)) != json.dumps(current.get(k))]


def save_final_weights(model: nn.Module, path: Path, classes: list[str]) -> None:
    """``vitlab.save`` (the native safetensors format, class names in its metadata; loadable with ``vitlab.load``)
    plus ``classes.json`` next to it for models the native format does not describe."""
    import vitlab

    vitlab.save(model, path, labels=classes)
    atomic_write(path.parent / "classes.json", lambda tmp: Path(tmp).write_text(json.dumps(classes)))


def train(config: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train (or fine-tune, with ``config.init``) on ``data_dir`` (``train/`` and ``val/`` or ``test/``).

    ``out_dir`` receives ``checkpoint.pt`` (resumable), ``config.json``, ``metrics.jsonl``, ``run.log`` lines for
    skipped images, ``model.safetensors`` + ``classes.json`` and ``final.json``. Returns the final metrics
    (``top1`` etc. on the validation split, when there is one, plus throughput). Under torchrun every process calls
    this; rank 0 writes the files.
    """
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, Path(out_dir), data_dir, resume, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(config: TrainConfig, run_dir: Path, data_dir: str | Path, resume: bool,
           progress: bool | None) -> dict[str, Any]:
    d = setup_distributed()
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and d.main
    precision = resolve(config.precision, d.device)
    if d.main:
        print(f"vitlab train: precision {precision} ({config.precision} on {hardware(d.device)})", file=sys.stderr,
              flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    fsdp = d.world > 1 and config.distributed == "fsdp"
    if config.budget_minutes and d.world > 1:
        raise ValueError("budget_minutes needs a single process (each process would measure its own schedule)")

    state = None
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT)
        diff = _config_diff(state["config"], config.to_dict())
        if diff:
            raise ValueError(f"{run_dir / CHECKPOINT}: --resume with a different config:\n  " + "\n  ".join(diff))
    elif d.main and (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a training checkpoint; pass --resume to continue it or "
                              f"choose another --out")

    data = build_data(config, data_dir, d, progress)
    num_classes = config.num_classes or len(data.classes)
    spe = data.train.steps_per_epoch(config.batch_size)
    if spe == 0:
        raise ValueError(f"{data_dir}: {data.train.num_samples} training images are fewer than one batch "
                         f"(batch_size={config.batch_size})")
    total_steps = config.steps or max(1, round(config.epochs * spe))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * spe)
    eval_interval = round(config.eval_every * spe) if config.eval_every > 0 else 0
    if d.main:
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config.to_dict(), indent=1)))

    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(config, num_classes).to(d.device).train()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 and not fsdp else None
    optimizer = build_optimizer(model, config)
    step = 0
    if state is not None:
        _load_full_state(model, optimizer, state, fsdp)
        if ema is not None and state.get("ema"):
            ema.state = {k: v.to(d.device) for k, v in state["ema"].items()}
        set_rng_states(state["rng"])
        step = int(state["step"])
    # Early stopping (keep_best, patience): the best validation top-1 so far, its step, evaluations since.
    best: dict[str, Any] = dict((state or {}).get("best") or {"top1": None, "step": None, "since": 0})
    train_model: nn.Module = model
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    eager_model, compile_pending = train_model, config.compile
    if config.compile:
        train_model = torch.compile(train_model)

    metrics = MetricsLog(run_dir, enabled=d.main, tensorboard=config.tensorboard,
                         resume_step=step if state is not None else None)
    bad_seen: list[BadSample] = list(state.get("bad", [])) if state is not None else []
    bad_seen = [BadSample(*b) if isinstance(b, list) else b for b in bad_seen]
    _record_bad(data.bad, bad_seen, run_dir, d, config.strict)

    stop = {"signal": None}

    def on_sigterm(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None

    def checkpoint() -> None:
        model_state, optim_state = _full_state(model, optimizer, fsdp)
        if not d.main:
            return
        save_checkpoint(run_dir / CHECKPOINT, {
            "model": model_state, "optimizer": optim_state,
            "scheduler": {"kind": config.schedule, "step": step, "total_steps": total_steps, "warmup_steps": warmup,
                          "lr": lr_at(max(step - 1, 0), total_steps=total_steps, peak=config.lr,
                                      warmup_steps=warmup, kind=config.schedule, min_lr=config.min_lr)},
            "ema": ema.state if ema is not None else {},
            "rng": rng_states(), "elapsed": time.perf_counter() - loop_start, "step": step, "epoch": step / spe,
            "config": config.to_dict(), "best": best,
            "classes": data.classes, "bad": [[b.path, b.reason] for b in bad_seen],
        })

    def save_weights(path: Path) -> None:
        """The current weights (EMA applied) as ``vitlab.save`` writes them; a collective under FSDP."""
        full_state = _full_state(model, optimizer, fsdp)[0] if fsdp else None
        if not d.main:
            return
        import copy

        if fsdp:
            weights = build_model(config, num_classes)
            weights.load_state_dict(full_state)
        else:
            weights = copy.deepcopy(_unwrap(model)).cpu()
        if ema is not None:
            ema.copy_to(weights)
        save_final_weights(weights, path, data.classes)

    def track_best(evaluation: dict[str, Any]) -> bool:
        """Record an evaluation for early stopping (saving the weights when it is the best so far); True when
        ``patience`` evaluations in a row have not improved on the best."""
        if not config.keep_best and config.patience is None:
            return False
        if best["top1"] is None or evaluation["top1"] > best["top1"]:
            best.update(top1=evaluation["top1"], step=step, since=0)
            if config.keep_best:
                save_weights(run_dir / BEST)
                if d.main:
                    atomic_write(run_dir / "best.json", lambda tmp: Path(tmp).write_text(json.dumps(
                        {"step": step, "epoch": step / spe, **{k: evaluation[k] for k in ("top1", "top5", "loss")}},
                        indent=1)))
        else:
            best["since"] += 1
        return config.patience is not None and best["since"] >= config.patience

    def run_eval() -> dict[str, Any] | None:
        if data.val is None:
            return None
        eval_model = _unwrap(model)
        if ema is not None:
            import copy

            eval_model = copy.deepcopy(eval_model)
            ema.copy_to(eval_model)
        return evaluate(eval_model, data.val, precision=config.precision, device=d.device, classes=data.classes,
                        num_classes=num_classes)

    micro = config.batch_size // config.accum_steps
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    train_time, images_seen, data_time = 0.0, 0, 0.0
    prefetch = _prefetches(d.device)
    budget_s = config.budget_minutes * 60 if config.budget_minutes else None
    step_cap = total_steps
    resumed_elapsed = float(state.get("elapsed", 0.0)) if state is not None else 0.0
    loop_start = time.perf_counter() - resumed_elapsed
    start_step = step
    rate_mark = (step, loop_start)
    current_size, mark_at = None, start_step + 10
    stages = config.resolution_stages()
    last_loss, result_eval, gnorm = float("nan"), None, None
    interrupted = stopped_early = False

    def run_fraction() -> float:
        """How far the run is: of the wall-clock budget, or of the steps."""
        if budget_s is not None:
            return (time.perf_counter() - loop_start) / budget_s
        return step / total_steps

    def set_mixing() -> None:
        data.train.mixing = run_fraction() < 1.0 - config.mix_off_fraction

    def optimizer_step(parts: list, lr: float, size: int) -> tuple[float, float]:
        nonlocal train_model, compile_pending
        try:
            result = train_step(train_model, optimizer, parts, config=config, device=d.device, step=step,
                                rank=d.rank, lr=lr, image_size=size)
        except NonFiniteLossError:
            raise
        except Exception as e:  # noqa: BLE001 - only the first compiled step may fall back
            if not compile_pending:
                raise
            # No C++ toolchain, an unsupported op...: train eagerly rather than not at all.
            log.warning("torch.compile failed (%s: %s); continuing without it", type(e).__name__, e)
            optimizer.zero_grad(set_to_none=True)
            train_model = eager_model
            result = train_step(train_model, optimizer, parts, config=config, device=d.device, step=step,
                                rank=d.rank, lr=lr, image_size=size)
        compile_pending = False
        if ema is not None:
            ema.update(model)
        return result

    set_mixing()
    stream = _BatchStream(data.train, spe, step, config.batch_size, d, prefetch)
    try:
        while step < total_steps and not stop["signal"]:
            t_data = time.perf_counter()
            x, y, bad = next(stream)
            if bad:
                _record_bad(bad, bad_seen, run_dir, d, config.strict)
            t0 = time.perf_counter()
            data_time += t0 - t_data
            fraction = run_fraction()
            size = next((s for s, end in stages if fraction < end), config.image_size)
            if current_size is not None and size != current_size:
                mark_at = step + 3  # measure the new phase's step rate, after recompiling
            current_size = size
            if budget_s is not None and step == mark_at:
                rate_mark = (step, time.perf_counter())  # after warm-up and torch.compile's first steps
            if budget_s is not None and step - start_step >= 20 and step - rate_mark[0] >= 10:
                total_steps = min(step_cap, _budget_steps(stages, step, rate_mark, time.perf_counter() - loop_start,
                                                          budget_s, size))
            lr = lr_at(step, total_steps=total_steps, peak=config.lr, warmup_steps=warmup, kind=config.schedule,
                       min_lr=config.min_lr)
            parts = list(zip(x.split(micro // d.world), y.split(micro // d.world))) if len(y) else []
            if parts:
                last_loss, gnorm = optimizer_step(parts, lr, size)
            step += 1
            set_mixing()  # before the next batch is drawn
            train_time += time.perf_counter() - t0
            images_seen += len(y) * d.world
            ips = images_seen / max(train_time + data_time, 1e-9)
            if step % config.log_every == 0 or step == total_steps:
                metrics.write({"step": step, "epoch": round(step / spe, 4), "loss": last_loss, "lr": lr,
                               "grad_norm": gnorm if parts else None, "img_per_s": round(ips, 1),
                               "time": round(time.time(), 3)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            done = step >= total_steps or (budget_s is not None and time.perf_counter() - loop_start >= budget_s)
            if done:
                break
            if eval_interval and step % eval_interval == 0:
                result_eval = run_eval()
                if result_eval is not None:
                    metrics.write({"step": step, "epoch": round(step / spe, 4), "split": "val",
                                   **{k: result_eval[k] for k in ("top1", "top5", "loss")}})
                    log.info("step %d: val top1 %.2f%%", step, result_eval["top1"])
                    stopped_early = track_best(result_eval)
                checkpoint()
                if stopped_early:
                    log.info("early stopping at step %d: no better validation top-1 in %d evaluations since step "
                             "%d (%.2f%%)", step, config.patience, best["step"], best["top1"])
                    break
            elif step % config.checkpoint_every == 0:
                checkpoint()
        if stop["signal"]:
            interrupted = True
            checkpoint()
            log.warning("received signal %s: checkpoint saved at step %d in %s; continue with --resume",
                        stop["signal"], step, run_dir / CHECKPOINT)
    finally:
        stream.close()
        if bar is not None:
            bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    loop_s = max(train_time + data_time, 1e-9)
    # The loader's own rate: its busy time when prefetching, else the wait for it.
    loader_s = stream.busy_s if prefetch else data_time
    result: dict[str, Any] = {"step": step, "total_steps": total_steps, "epochs": step / spe,
                              "train_loss": last_loss, "interrupted": interrupted,
                              "train_img_per_s": images_seen / loop_s if images_seen else None,
                              "data_wait_fraction": data_time / loop_s if images_seen else None,
                              "loader_img_per_s": images_seen / loader_s if loader_s > 0 else None,
                              "train_seconds": train_time + data_time, "in_memory": data.in_memory,
                              "world_size": d.world, "skipped_images": len(bad_seen),
                              "precision": precision, "hardware": hardware(d.device)}
    if interrupted:
        metrics.close()
        return result
    checkpoint()
    # An early stop has just evaluated these weights.
    final_eval = result_eval if stopped_early else run_eval()
    if final_eval is not None:
        result.update({k: final_eval[k] for k in ("top1", "top5", "loss", "n", "per_class")})
        if not stopped_early:
            metrics.write({"step": step, "epoch": round(step / spe, 4), "split": "val",
                           **{k: final_eval[k] for k in ("top1", "top5", "loss")}})
            track_best(final_eval)
    if config.keep_best or config.patience is not None:
        result.update(best=dict(best), stopped_early=stopped_early)
    save_weights(run_dir / WEIGHTS)
    if d.main:
        result["weights"] = str(run_dir / WEIGHTS)
        atomic_write(run_dir / "final.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    metrics.close()
    if d.world > 1:
        dist.barrier()
    return result


def _prefetches(device: torch.device) -> bool:
    """On a GPU the next batches are augmented while the step runs (Prefetch); on CPU they would share its cores."""
    return device.type == "cuda"


class _BatchStream:
    """The training batches from ``start_step`` on, one per optimiser step, across epochs. With ``prefetch`` (GPU)
    each epoch's batches are produced by a :class:`Prefetch` thread; ``busy_s`` adds up those threads' busy time."""

    def __init__(self, train_data: Any, spe: int, start_step: int, global_batch: int, d: Dist,
                 prefetch: bool) -> None:
        self.busy_s = 0.0
        self._batches = self._generate(train_data, spe, start_step, global_batch, d, prefetch)

    def _generate(self, train_data: Any, spe: int, step: int, global_batch: int, d: Dist,
                  prefetch: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadSample]]]:
        while True:
            batches = train_data.epoch(step // spe, step % spe, global_batch, d.rank, d.world)
            prefetcher = Prefetch(batches, pin=d.device.type == "cuda") if prefetch else None
            try:
                for item in prefetcher if prefetcher is not None else batches:
                    step += 1
                    yield item
            finally:
                if prefetcher is not None:
                    prefetcher.close()
                    self.busy_s += prefetcher.busy_s

    def __iter__(self) -> "_BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
        return next(self._batches)

    def close(self) -> None:
        """Stops the current epoch's prefetch thread (and counts its busy time)."""
        self._batches.close()


def _budget_steps(stages: list[tuple[int, float]], step: int, rate_mark: tuple[int, float], elapsed: float,
                  budget_s: float, size: int) -> int:
    """Time-budget mode: the schedule's length re-estimated from the step rate measured since ``rate_mark``
    (step, perf_counter time) at the current resolution ``size``. The time left at each resolution of ``stages``
    (``TrainConfig.resolution_stages``) runs at that rate scaled by the token ratio (a step's time grows about
    with its tokens)."""
    now = time.perf_counter()
    rate = (step - rate_mark[0]) / max(now - rate_mark[1], 1e-9)
    future, begin = 0.0, 0.0
    for stage_size, end in stages:
        left = max(0.0, end * budget_s - max(begin * budget_s, elapsed))
        future += rate * left * (size / stage_size) ** 2
        begin = end
    return max(step + 1, round(step + future))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _record_bad(new: list[BadSample], seen: list[BadSample], run_dir: Path, d: Dist, strict: bool) -> None:
    """Skip unreadable images (count them, list their paths in ``RUN_DIR/run.log``) or stop under ``strict``."""
    if not new:
        return
    if strict:
        raise BadImageError(new[0].path, new[0].reason + " (--strict: stopping at the first unreadable image)")
    known = {b.path for b in seen}
    fresh = [b for b in new if b.path not in known]
    seen += fresh
    if fresh and d.main:
        with open(run_dir / "run.log", "a") as f:
            for b in fresh:
                f.write(f"skipped unreadable image {b.path}: {b.reason}\n")
        log.warning("skipped %d unreadable image(s) (%d so far), listed in %s", len(fresh), len(seen),
                    run_dir / "run.log")
