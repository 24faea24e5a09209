"""Running a study: a grid of training runs ("cells") with resume, one overall progress bar and a time budget.

A study directory holds ``plan.json`` (the request and the number of optimisation steps every cell gets),
``cells/<key>/`` (each cell's training run, resumable by the training engine) and ``results/<key>.json`` (written
atomically once the cell has finished). A finished cell is never run again; a cell interrupted mid-training
continues from its last checkpoint. Asking a study directory for a different study raises an error instead of
mixing results.

``--budget-minutes`` is turned into steps once, before the first cell: each distinct model is timed for a few
training steps on a synthetic batch, and the steps are the largest count such that every cell together (training,
plus an estimate of decoding and evaluation) fits the budget. The count is stored in the plan, so a resumed study
keeps it. A probe timed while other processes take the CPU reads slow and would plan too few steps for good, so
the probe watches the machine's other load and times again when it finds the CPU shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from vitlab.io import atomic_write
from vitlab.train.config import TrainConfig

log = logging.getLogger(__name__)

# Per-step cost of the real data pipeline (in-memory batches, crop, flip, RandAugment) and logging over the
# synthetic probe step; measured on the 2-core development CPU with the small-scratch recipe (docs/study.md).
PIPELINE_FACTOR = 1.25
# Fallback cost of decoding one image into memory (train subset + test split, every cell), in seconds, when
# it cannot be measured; measured, it was 0.3-0.8 ms for a 32-px JPEG on the 2-core machine depending on its load.
DECODE_SECONDS_PER_IMAGE = 6e-4
# Starting the run, the first (slower) step, writing checkpoints and the final weights, per cell.
CELL_OVERHEAD_SECONDS = 5.0
MIN_STEPS = 10
# Cores that other processes (or the hypervisor, as steal time) may keep busy during a step probe before it counts
# as taken on a shared CPU: a compiler job beside a 2-thread probe on 2 cores made it read 5x slow.
SHARED_CPU_CORES = 0.3
PROBE_TRIES = 3
PROBE_RETRY_WAIT_SECONDS = 10.0


@dataclass
class Cell:
    """One training run of a study: what varies (``label``), the full training config and the data it reads."""

    key: str
    label: dict[str, Any]
    config: TrainConfig
    data_dir: Path
    num_train: int = 0
    num_test: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    """Numbers known before training (sequence length, FLOPs, subset digest), copied into the result."""


# ------------------------------------------------------------------------------------------------ model specs
def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ViT-Ti/16:patch_size=4:depth=6"`` -> ``("ViT-Ti/16", {"patch_size": 4, "depth": 6})`` (values are
    YAML). The name and every override are checked by building the config."""
    from vitlab.model import config_from_name

    name, *parts = spec.strip().split(":")
    overrides: dict[str, Any] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"model spec {spec!r}: expected NAME[:key=value...], got the part {part!r}")
        key, raw = part.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    config_from_name(name, **overrides)  # raises a ValueError naming what is allowed
    return name, overrides


def model_slug(spec: str) -> str:
    """A file-name-safe form of a model spec: ``ViT-Ti/16:depth=6`` -> ``ViT-Ti-16_depth6``."""
    name, overrides = parse_model_spec(spec)
    parts = [name.replace("/", "-").replace("+", "plus")]
    parts += [f"{k}{v}" for k, v in overrides.items()]
    return "_".join(parts).replace(" ", "")


def split_list(text: str, kind: type = str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


# --------------------------------------------------------------------------------------------------- plan
def load_or_make_plan(out_dir: Path, request: dict[str, Any], make_steps: Callable[[], dict[str, Any]]) -> dict:
    """The study's plan: the stored one if ``request`` matches it, else a new one (``make_steps`` returns the step
    counts the cells need, e.g. ``{"steps": N}``). A stored plan for a different request raises a ``ValueError``
    naming the differences."""
    path = out_dir / "plan.json"
    if path.is_file():
        try:
            plan = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); remove it to start the study again") from None
        diff = _diff(plan.get("request", {}), request)
        if diff:
            raise ValueError(f"{path} belongs to a different study request; finished cells would be mixed with new "
                             f"ones. Use another --out, or repeat the original arguments. Differences:\n  "
                             + "\n  ".join(diff))
        log.info("resuming the study in %s", out_dir)
        return plan
    plan = {"request": request, **make_steps(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1)))
    return plan


def _diff(stored: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Differences between two requests, descending into nested dicts (the recipe) so only changed keys show."""
    out = []
    for k in sorted(set(stored) | set(now)):
        a, b = stored.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{k}: stored {a!r} vs now {b!r}")
    return out


def recipe_request(config: TrainConfig) -> dict[str, Any]:
    """The parts of a recipe that change results (threads, workers, logging ... may differ on resume)."""
    from vitlab.train.engine import RESUMABLE_CHANGES

    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}


# ------------------------------------------------------------------------------------------------- budget
def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy since boot (``/proc/stat``, steal included), or
    None where that file does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context manager: how many cores other processes kept busy (``cores``) while the block ran, from the
    machine's busy time minus this process's own CPU time; ``cores`` is None where the OS does not tell."""

    cores: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._busy, self._own, self._t = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _machine_busy_seconds(), time.perf_counter() - self._t
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        self.cores = max(0.0, others / wall)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def probe_step_seconds(config: TrainConfig, num_classes: int, *, steps: int = 8, warmup: int = 2,
                       max_seconds: float = 20.0, tries: int = PROBE_TRIES,
                       retry_wait: float | None = None) -> float:
    """Median seconds of one training step of ``config``'s model on a synthetic batch, after ``warmup`` steps
    (the first steps build kernels and caches and are several times slower).

    While other processes keep more than :data:`SHARED_CPU_CORES` cores busy, the timing is repeated (up to
    ``tries`` times, ``retry_wait`` seconds apart, default :data:`PROBE_RETRY_WAIT_SECONDS`) and the fastest
    median kept, with a warning if the CPU never came free: every step count planned from the probe would
    otherwise be too small by the slowdown."""
    from vitlab.train.engine import build_model, build_optimizer, train_step

    if config.threads:
        torch.set_num_threads(config.threads)  # as train() will
    torch.manual_seed(config.seed)
    model = build_model(config.replace(init=None), num_classes).train()
    optimizer = build_optimizer(model, config)
    micro = config.batch_size // config.accum_steps
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size)
    y = torch.randint(0, num_classes, (config.batch_size,))
    parts = list(zip(x.split(micro), y.split(micro)))
    device = torch.device("cpu")
    step = 0

    def one_step() -> float:
        nonlocal step
        t0 = time.perf_counter()
        train_step(model, optimizer, parts, config=config, device=device, step=step, rank=0, lr=config.lr * 1e-3)
        step += 1
        return time.perf_counter() - t0

    for _ in range(warmup):
        one_step()
    retry_wait = PROBE_RETRY_WAIT_SECONDS if retry_wait is None else retry_wait
    best = float("inf")
    for attempt in range(1, max(1, tries) + 1):
        times: list[float] = []
        with OtherLoad() as load:
            start = time.perf_counter()
            while len(times) < steps and not (times and time.perf_counter() - start > max_seconds):
                times.append(one_step())
        times.sort()
        best = min(best, times[len(times) // 2])
        if load.cores is None or load.cores <= SHARED_CPU_CORES:
            return best
        if attempt < tries:
            log.warning("step probe of %s: other processes kept %.1f cores busy; timing again in %.0f s",
                        config.model, load.cores, retry_wait)
            time.sleep(retry_wait)
    log.warning("step probe of %s: the CPU stayed shared (other processes kept %.1f cores busy in %d tries); "
                "planning with the fastest probe, %.3f s/step, which gives too few steps if the study then runs "
                "with the CPU to itself: stop the other work and start the study again in a new --out directory",
                config.model, load.cores, tries, best)
    return best


def probe_decode_seconds(data_dir: Path, image_size: int, max_images: int = 200) -> float:
    """Seconds to decode one training image of ``data_dir`` into memory (as the engine does), from a sample."""
    from vitlab.data.folder import scan, split_dirs
    from vitlab.data.images import BadImageError, load_rgb

    train_dir, _ = split_dirs(data_dir)
    samples, _ = scan(train_dir)
    sample = samples[:: max(1, len(samples) // max_images)][:max_images]
    start = time.perf_counter()
    for path, _ in sample:
        try:
            load_rgb(path, max_side=image_size).resize((image_size, image_size))
        except BadImageError:
            pass
    return (time.perf_counter() - start) / max(1, len(sample))


def _probe_key(config: TrainConfig) -> str:
    return json.dumps([config.model, config.model_overrides, config.batch_size, config.image_size], sort_keys=True)


@dataclass
class CellCosts:
    """What :func:`cell_costs` measured: per cell, seconds per optimisation step, seconds that do not depend on
    the steps (decoding, evaluation, start-up) and seconds per image of a forward pass, with the probe timings."""

    per_step: list[float]
    fixed: list[float]
    probes: dict[str, float]
    decode: float
    forward: list[float] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"probe_seconds_per_step": self.probes, "probe_decode_seconds_per_image": self.decode}


def cell_costs(cells: list[Cell], num_classes: int, *, evaluations: list[int] | None = None,
               known: CellCosts | None = None) -> CellCosts:
    """Time each distinct (model, batch, resolution) of ``cells`` for a few steps and estimate every cell's cost.

    ``evaluations[i]``: how many times cell ``i`` evaluates its ``num_val`` validation images (``info``), besides
    the one evaluation of its test split; a forward pass costs about a third of a training step. ``known``: costs
    measured earlier in the same plan, whose step probes are reused (decoding is measured on these cells' data).
    """
    try:
        decode = probe_decode_seconds(cells[0].data_dir, cells[0].config.image_size)
    except (OSError, ValueError):
        decode = DECODE_SECONDS_PER_IMAGE
    probes: dict[str, float] = dict(known.probes) if known is not None else {}
    per_step, fixed, forwards = [], [], []
    for i, cell in enumerate(cells):
        key = _probe_key(cell.config)
        if key not in probes:
            probes[key] = probe_step_seconds(cell.config, num_classes)
            log.info("probe %s: %.3f s/step", key, probes[key])
        per_step.append(probes[key] * PIPELINE_FACTOR)
        num_val = int(cell.info.get("num_val", 0))
        forward = probes[key] / 3.0 / cell.config.batch_size  # seconds per evaluated image
        seconds = decode * (cell.num_train + cell.num_test + num_val) + CELL_OVERHEAD_SECONDS
        seconds += forward * (cell.num_test + (evaluations[i] if evaluations else 0) * num_val)
        fixed.append(seconds)
        forwards.append(forward)
    return CellCosts(per_step, fixed, probes, decode, forwards)


def steps_for_budget(cells: list[Cell], budget_minutes: float, num_classes: int) -> dict[str, Any]:
    """The common step count that makes all ``cells`` fit ``budget_minutes``, with the probe timings used."""
    costs = cell_costs(cells, num_classes)
    per_step, fixed = sum(costs.per_step), sum(costs.fixed)
    budget = budget_minutes * 60.0
    steps = int((budget - fixed) / per_step) if per_step > 0 else MIN_STEPS
    if steps < MIN_STEPS:
        log.warning("a %.1f-minute budget leaves %d steps per cell; using %d (the study will take longer)",
                    budget_minutes, steps, MIN_STEPS)
        steps = MIN_STEPS
    return {"steps": steps, "budget_minutes": budget_minutes, **costs.record(),
            "estimated_minutes": round((fixed + steps * per_step) / 60.0, 2)}


def fit_budget(costs: CellCosts, steps_of: Callable[[float], list[int]], budget_minutes: float,
               extra_seconds: float = 0.0) -> float:
    """The largest ``x`` for which cells of ``steps_of(x)`` steps (non-decreasing in ``x``), at the measured
    ``costs``, fit ``budget_minutes`` together with ``extra_seconds`` of other work (found by bisection): how a study
    whose cells get different step counts (in proportion to their data, or to a compute budget) turns minutes into
    steps. 0 when not even ``steps_of(0)`` fits (the study then takes longer than asked, with a warning)."""
    def seconds(x: float) -> float:
        return sum(costs.fixed) + extra_seconds + sum(t * n for t, n in zip(costs.per_step, steps_of(x)))

    budget = budget_minutes * 60.0
    if seconds(0.0) > budget:
        log.warning("a %.1f-minute budget does not cover the smallest allowed steps (estimated %.1f minutes)",
                    budget_minutes, seconds(0.0) / 60.0)
        return 0.0
    lo, hi = 0.0, 1.0
    while seconds(hi) <= budget and hi < 1e9:
        lo, hi = hi, hi * 2.0
    for _ in range(50):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if seconds(mid) <= budget else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------- run
def run_cells(cells: list[Cell], out_dir: Path, *, study: str,
              before: Callable[[Cell], None] | None = None,
              after: Callable[[Cell, Path], dict[str, Any]] | None = None,
              on_result: Callable[[list[dict[str, Any]]], Any] | None = None,
              progress: bool | None = None) -> list[dict[str, Any]]:
    """Train every cell not finished yet (in order) and return all cells' results.

    ``before(cell)`` prepares what a cell reads and an earlier cell made (e.g. a converted checkpoint to fine-tune
    from); ``after(cell, run_dir)`` adds study-specific numbers measured on the trained model (e.g. the position
    embedding's topology, or the test accuracy at the best validation step), and may replace the record's
    ``top1``; ``on_result(results so far)`` runs after each newly finished cell, so the study's
    summary is current even if it is stopped. A cell interrupted by a signal stops the study; rerunning the same
    command continues it.
    """
    from vitlab.train import train

    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate study cells: {sorted(k for k in keys if keys.count(k) > 1)}")
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(c.config.steps or 0 for c in cells)
        bar = tqdm(total=total, desc=study, unit="step", position=0, dynamic_ncols=True)
    results = []
    try:
        for index, cell in enumerate(cells, 1):
            where = f"[{index}/{len(cells)}] {cell.key}"  # overall progress in the log when there is no bar
            path = results_dir / f"{cell.key}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
                log.info("%s: finished earlier, skipped", where)
                if bar is not None:
                    bar.update(cell.config.steps or 0)
                continue
            if bar is not None:
                bar.set_postfix_str(cell.key)
            if before is not None:
                before(cell)
            run_dir = out_dir / "cells" / cell.key
            resume = (run_dir / "checkpoint.pt").is_file()
            log.info("%s: %s %d steps on %s", where, "resuming" if resume else "training", cell.config.steps,
                     cell.data_dir)
            start = time.perf_counter()
            result = train(cell.config, cell.data_dir, run_dir, resume=resume, progress=progress)
            if result.get("interrupted"):
                log.warning("%s interrupted; rerun the same command to continue", cell.key)
                break
            record = {
                "study": study, "key": cell.key, "label": cell.label, "info": cell.info,
                "num_train": cell.num_train, "num_test": cell.num_test,
                "top1": result.get("top1"), "top5": result.get("top5"), "test_loss": result.get("loss"),
                "steps": result.get("step"), "epochs": result.get("epochs"),
                "train_loss": result.get("train_loss"), "train_seconds": result.get("train_seconds"),
                "train_img_per_s": result.get("train_img_per_s"),
                "wall_seconds": round(time.perf_counter() - start, 2),
                "per_class": result.get("per_class"), "run_dir": str(run_dir),
                "config": dataclasses.asdict(cell.config),
            }
            if "best" in result:  # early stopping: the best validation evaluation and whether the run stopped
                record.update(best=result["best"], stopped_early=result["stopped_early"])
            if after is not None:
                record.update(after(cell, run_dir))
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            results.append(record)
            if on_result is not None:
                on_result(list(results))
            log.info("%s: top-1 %.2f%% in %.0f s", where, record["top1"] or float("nan"), record["wall_seconds"])
            if bar is not None:
                bar.update(cell.config.steps or 0)
    finally:
        if bar is not None:
            bar.close()
    return results
