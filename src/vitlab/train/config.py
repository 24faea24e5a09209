"""The typed training configuration, its presets and ``--set key=value`` overrides.

A :class:`TrainConfig` holds every choice of a run (model, data, optimiser, schedule, augmentation,
regularisation, engine). It is loaded from a preset name (``src/vitlab/presets/NAME.yaml``), a YAML/JSON file or a
Python file defining ``config`` (a dict or a ``TrainConfig``), then overridden by ``key=value`` strings whose values
are parsed as YAML and checked against the field's type. The resolved config is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from vitlab.typecheck import check_types, hints, matches

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


@dataclass
class TrainConfig:
    """Everything that defines a training or fine-tuning run. Defaults are a small from-scratch run."""

    # --- model
    model: str = "ViT-Ti/16"
    """A ``vitlab.create_model`` name."""
    model_overrides: dict = field(default_factory=dict)
    """Extra keyword arguments for ``create_model`` (e.g. ``patch_size``, ``depth``, ``drop_path``, ``classifier``)."""
    image_size: int = 224
    low_res_size: Union[int, list[int], None] = None
    """Train at this lower resolution first, then at ``image_size`` (the model's, used for evaluation): the
    position embedding is sampled at the smaller grid (``interpolate_pos_embed``), so each image costs fewer tokens.
    The paper's pre-train-low / fine-tune-high split inside one run. A list (lowest first, e.g. ``[16, 24]``)
    trains at each size in turn: progressive resizing."""
    low_res_fraction: Union[float, list[float]] = 0.8
    """Share of the run at ``low_res_size``: of the steps, or of the wall-clock budget with ``budget_minutes``.
    With a list of sizes, a list of the same length: the share of the run at which each size ends (increasing)."""
    num_classes: Optional[int] = None
    """Head size; ``None`` takes the number of class folders of the training data."""
    init: Optional[str] = None
    """Checkpoint to fine-tune from (any source ``vitlab.load`` reads); the head is replaced by a fresh zero head."""
    init_format: Optional[str] = None
    """Format passed to ``vitlab.load`` when the file does not say it."""
    init_drop_pre_logits: bool = True
    """Fine-tuning replaces the whole pre-trained head, pre-logits layer included (paper Sec. 3.2)."""
    attention_init: Literal["default", "mimetic"] = "default"
    """From scratch only: ``mimetic`` starts attention near the structure of trained ViTs (``vitlab.train.init``)."""

    # --- schedule and optimiser
    epochs: float = 10.0
    steps: Optional[int] = None
    """Total optimiser steps; overrides ``epochs`` when set (the paper counts steps)."""
    budget_minutes: Optional[float] = None
    """Wall-clock budget of the training loop: the schedule runs on elapsed time (its length is re-estimated from
    the measured step rate) and the run stops when the budget is spent, ``epochs``/``steps`` being an upper bound.
    Such a run is not bit-exact on resume."""
    batch_size: int = 128
    """Global batch (all processes and accumulation steps together)."""
    accum_steps: int = 1
    """Gradient accumulation: the batch is split into this many micro-batches per optimiser step."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.05
    decay_embeddings: bool = False
    """Also decay position embedding and class token (norms and biases are never decayed)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Optional[int] = None
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = 1.0
    """Clip the global gradient norm to this value; ``None`` disables clipping."""

    # --- loss, augmentation and regularisation
    label_smoothing: float = 0.0
    crop: Literal["inception", "pad", "resize"] = "inception"
    """``inception``: random-resized crop (the paper's); ``pad``: pad by ``crop_pad`` and crop back (CIFAR);
    ``resize``: resize only."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_pad: int = 4
    hflip: bool = True
    randaugment_n: int = 0
    """RandAugment: number of operations per image (0 disables it)."""
    randaugment_m: int = 9
    """RandAugment magnitude (0-30)."""
    randaugment_group: int = 8
    """In-memory mode: images per RandAugment draw (one call per group of this many; 1 = per image, slowest)."""
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha) parameter; 0 disables it."""
    cutmix: float = 0.0
    """CutMix Beta(alpha, alpha) parameter; 0 disables it. With both on, one of the two is drawn per batch."""
    mix_prob: float = 1.0
    mix_off_fraction: float = 0.0
    """The last share of the run (of the steps, or of the wall-clock budget with ``budget_minutes``) trains without
    mixup/cutmix, on the clean targets, so the model ends on the images it will be tested on. (On a GPU the batches
    already prefetched at the switch still mix.)"""
    normalize: Literal["auto", "official", "imagenet", "none"] = "auto"
    """``official``: pixels to [-1, 1] as the official checkpoints; ``imagenet``: mean/std; ``auto``: official."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights; 0 disables it. Evaluation uses the EMA weights when on."""

    # --- engine
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else fp32
    (``vitlab.precision``)."""
    compile: bool = False
    seed: int = 0
    in_memory: Union[bool, Literal["auto"]] = "auto"
    """Decode the whole dataset once into a uint8 tensor and augment whole batches (small datasets)."""
    in_memory_max_mb: int = 2048
    workers: int = 2
    """DataLoader worker processes when not in memory."""
    threads: Optional[int] = None
    """``torch.set_num_threads`` for the run."""
    strict: bool = False
    """Stop at the first unreadable image instead of skipping it."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Strategy under torchrun: DistributedDataParallel, or FSDP2 ``fully_shard`` per block."""
    eval_every: float = 1.0
    """Evaluate on the validation split every this many epochs (0: only at the end)."""
    keep_best: bool = False
    """Also keep the weights of the evaluation with the best validation top-1 so far (``best.safetensors``, its
    step and accuracy in ``best.json``): the checkpoint the paper's early stopping reports (Sec. 4.2)."""
    patience: Optional[int] = None
    """Early stopping: end the run after this many evaluations in a row without a better validation top-1."""
    eval_batch_size: int = 256
    checkpoint_every: int = 500
    """Write the resumable checkpoint every this many steps (and at each evaluation and at the end)."""
    log_every: int = 20
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_types(self)  # every field against its annotation (vitlab.typecheck, shared with ViTConfig)
        if self.batch_size < 1 or self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of accum_steps "
                             f"({self.accum_steps})")
        if self.epochs <= 0 and not self.steps:
            raise ValueError("epochs must be positive (or set steps)")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive number of evaluations, got {self.patience}")
        if not 0.0 <= self.mix_off_fraction <= 1.0:
            raise ValueError(f"mix_off_fraction must be in [0, 1], got {self.mix_off_fraction}")
        self.resolution_stages()  # validates low_res_size and low_res_fraction

    def resolution_stages(self) -> list[tuple[int, float]]:
        """The training resolutions in order, as (size, share of the run at which it ends); the last is
        ``(image_size, 1.0)``."""
        ends = self.low_res_fraction if isinstance(self.low_res_fraction, list) else [self.low_res_fraction]
        if any(not 0.0 <= e <= 1.0 for e in ends) or ends != sorted(ends):
            raise ValueError(f"low_res_fraction must be in [0, 1] (increasing for several sizes), got "
                             f"{self.low_res_fraction}")
        if self.low_res_size is None:
            return [(self.image_size, 1.0)]
        sizes = self.low_res_size if isinstance(self.low_res_size, list) else [self.low_res_size]
        if len(sizes) != len(ends) or not sizes:
            raise ValueError(f"low_res_fraction must give one end per low_res_size: {self.low_res_size} and "
                             f"{self.low_res_fraction}")
        if any(not 0 < s <= self.image_size for s in sizes):
            raise ValueError(f"low_res_size must be in (0, image_size={self.image_size}], got {self.low_res_size}")
        return list(zip(sizes, [float(e) for e in ends])) + [(self.image_size, 1.0)]

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {sorted(unknown)}; allowed: {field_names()}")
        data = {k: tuple(v) if isinstance(v, list) and _is_tuple_field(k) else v for k, v in data.items()}
        return cls(**data)


# Config keys that may differ between a run and its resumption: they change speed or logging, not the result.
RESUMABLE_CHANGES = {"workers", "threads", "tensorboard", "log_every", "checkpoint_every", "eval_batch_size",
                     "compile", "in_memory", "in_memory_max_mb", "eval_every", "strict"}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (outside :data:`RESUMABLE_CHANGES`) whose values differ between a checkpoint's config and now."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and json.dumps(saved.get(k)) != json.dumps(current.get(k))]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _hints() -> dict[str, Any]:
    return hints(TrainConfig)


def _is_tuple_field(name: str) -> bool:
    return typing.get_origin(_hints().get(name)) is tuple


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".py":
        namespace = runpy.run_path(str(path))
        if "config" not in namespace:
            raise ValueError(f"{path}: a Python config must define `config` (a dict or a TrainConfig)")
        cfg = namespace["config"]
        return cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML/JSON: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-4"`` -> ``("lr", 0.0003)``; values are YAML (``null``, ``[0.9, 0.99]``, ``{drop_path: 0.1}``)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text!r}: value is not valid YAML: {e}") from None
    return key, value


def load_config(preset_or_path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name (see :func:`list_presets`) or a YAML/JSON/Python file, then ``key=value`` overrides.

    ``model_overrides.KEY=VALUE`` sets one model override. Unknown keys and ill-typed values raise a ``ValueError``.
    """
    data: dict[str, Any] = {}
    if preset_or_path is not None:
        path = Path(preset_or_path)
        if path.suffix in (".yaml", ".yml", ".json", ".py") or path.exists():
            data = _read_file(path)
        elif (PRESET_DIR / f"{preset_or_path}.yaml").is_file():
            data = _read_file(PRESET_DIR / f"{preset_or_path}.yaml")
        else:
            raise ValueError(f"unknown preset or missing config file {str(preset_or_path)!r}; "
                             f"presets: {', '.join(list_presets())}")
    data = dict(data)
    data["model_overrides"] = dict(data.get("model_overrides") or {})
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("model_overrides."):
            data["model_overrides"][key.split(".", 1)[1]] = value
            continue
        if key not in field_names():
            raise ValueError(f"--set {text!r}: unknown key {key!r}; allowed: {field_names()}")
        if isinstance(value, str) and matches(1.5, _hints()[key]):
            # YAML 1.1 reads "3e-4" (no dot) as a string; a float field takes it as the number it means.
            try:
                value = float(value)
            except ValueError:
                pass
        data[key] = value
    return TrainConfig.from_dict(data)
