"""The benchmark: vitlab against timm's matching model in one process (same torch, threads, batch and weights),
interleaved A/B repetitions, medians, the vitlab/timm ratio per row, and model FLOP utilisation against a matmul
peak measured in the same run. Inference throughput, batch-1 latency, training steps (forward, backward, AdamW),
peak memory, onnxruntime inference and the data pipeline. Results are a JSON-able dict; ``format_table`` prints it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.bench.flops import count_flops
from vitlab.bench.models import BenchModel, bench_model, build_pair, build_timm, max_output_difference
from vitlab.bench.timing import interleaved, machine_info, matmul_peak, median, mfu
from vitlab.model.config import ViTConfig
from vitlab import io
from vitlab.precision import resolve

log = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16-autocast", "bf16-weights")
MODES = ("eager", "compile")
TASKS = ("infer", "latency", "train")
LIBS = ("vitlab", "timm")
# Training backward costs two forwards (one for activations' gradients, one for the weights').
TRAIN_FLOP_FACTOR = 3


@dataclass
class BenchSpec:
    """What to measure. The defaults are the full run of ``docs/speed.md``."""

    models: tuple[str, ...] = ("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "cifar")
    dtypes: tuple[str, ...] = DTYPES
    modes: tuple[str, ...] = MODES
    tasks: tuple[str, ...] = TASKS
    reps: int = 5
    latency_reps: int = 15
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    # Subsets (None = every model) for the expensive parts.
    compile_models: tuple[str, ...] | None = None
    compile_tasks: tuple[str, ...] = ("infer", "train")
    train_models: tuple[str, ...] | None = None
    infer_batch: dict[str, int] = field(default_factory=dict)
    train_batch: dict[str, int] = field(default_factory=dict)
    memory: bool = True
    onnx_models: tuple[str, ...] = ()
    data: bool = True
    data_batches: int = 10
    peak_n: int = 2048
    freeze: bool = True  # inductor freezing for compiled inference (constant-folds and prepacks weights)
    gelu: str | None = "exact"
    models_override: dict[str, ViTConfig] = field(default_factory=dict)  # tests: tiny configs under a key


# --------------------------------------------------------------------------------------------- call builders
def _autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compile(model: nn.Module, *, inference: bool, freeze: bool) -> nn.Module:
    # Freezing (weights as constants, prepacked for oneDNN) only applies to graphs run without grad and is read
    # when the graph compiles, i.e. at the first call, which infer_call makes inside _inductor_freezing.
    compiled = torch.compile(model, dynamic=False)
    compiled._vitlab_freeze = inference and freeze  # type: ignore[attr-defined]
    return compiled


@contextlib.contextmanager
def _inductor_freezing(enabled: bool):
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = enabled
    try:
        yield
    finally:
        inductor_config.freezing = old


def infer_call(model: nn.Module, x: torch.Tensor, dtype: str, device: str) -> Callable[[], torch.Tensor]:
    freeze = getattr(model, "_vitlab_freeze", False)

    def call() -> torch.Tensor:
        with torch.inference_mode() if not freeze else torch.no_grad(), _autocast(device, dtype), \
                _inductor_freezing(freeze):
            return model(x)

    return call


def train_call(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str, device: str) -> Callable[[], float]:
    """One optimiser step: forward (autocast for bf16), cross-entropy, backward, AdamW, zero grads."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)

    def call() -> float:
        with _autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # forces completion on every device

    return call


# ------------------------------------------------------------------------------------------------- one row
def result_row(bm: BenchModel, task: str, dtype: str, mode: str, batch: int, times: dict[str, list[float]],
         flops_per_image: int, peak: float, **extra: Any) -> dict:
    row: dict[str, Any] = {"model": bm.key, "task": task, "dtype": dtype, "mode": mode, "batch": batch}
    factor = TRAIN_FLOP_FACTOR if task == "train" else 1
    for lib, ts in times.items():
        t = median(ts)
        row[f"{lib}_ms"] = round(t * 1e3, 3)
        row[f"{lib}_img_s"] = round(batch / t, 3)
        row[f"{lib}_mfu"] = round(mfu(factor * flops_per_image * batch, t, peak), 4)
        row[f"{lib}_times_s"] = [round(v, 5) for v in ts]
    if "vitlab" in times and "timm" in times:
        row["ratio"] = round(median(times["timm"]) / median(times["vitlab"]), 3)  # vitlab speed / timm speed
    row.update(extra)
    return row


def cast_models(pair: dict[str, nn.Module], dtype: str) -> dict[str, nn.Module]:
    if dtype == "bf16-weights":
        return {lib: copy.deepcopy(m).to(torch.bfloat16) for lib, m in pair.items()}
    return pair


def bench_input(bm: BenchModel, batch: int, device: str, dtype: str) -> torch.Tensor:
    x = torch.randn(batch, bm.config.in_channels, *bm.config.image_hw, device=device)
    return x.to(torch.bfloat16) if dtype == "bf16-weights" else x


def _timed_first(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_model(bm: BenchModel, spec: BenchSpec, peaks: dict[str, float]) -> list[dict]:
    """Every row (dtype x mode x task) of one model."""
    device = spec.device
    ours, theirs = build_pair(bm.config)
    diff = max_output_difference(ours, theirs, bm.config)
    if diff > 1e-4:
        raise RuntimeError(f"{bm.key}: vitlab and timm outputs differ by {diff:.3g}; refusing to compare speed")
    base = {"vitlab": ours.to(device), "timm": theirs.to(device)}
    flops = count_flops(bm.config)
    rows = []
    for dtype in spec.dtypes:
        peak = peaks["bf16" if dtype.startswith("bf16") else "fp32"]
        models = cast_models(base, dtype)
        for mode in spec.modes:
            if mode == "compile" and spec.compile_models is not None and bm.key not in spec.compile_models:
                continue
            for task in spec.tasks:
                if mode == "compile" and task not in spec.compile_tasks:
                    continue
                if task == "train" and (dtype == "bf16-weights" or
                                        (spec.train_models is not None and bm.key not in spec.train_models)):
                    continue
                log.info("%s %s %s %s", bm.key, task, dtype, mode)
                extra: dict[str, Any] = {"max_abs_diff_fp32": diff}
                if task == "train":
                    batch = bm.train_batch
                    x = bench_input(bm, batch, device, dtype)
                    y = torch.randint(0, max(bm.config.num_classes, 1), (batch,), device=device)
                    fns = {}
                    for lib, m in base.items():
                        m = copy.deepcopy(m).train()
                        if mode == "compile":
                            m = _compile(m, inference=False, freeze=False)
                        fns[lib] = train_call(m, x, y, dtype, device)
                else:
                    batch = 1 if task == "latency" else bm.infer_batch
                    x = bench_input(bm, batch, device, dtype)
                    fns = {}
                    for lib, m in models.items():
                        if mode == "compile":
                            m = _compile(m, inference=True, freeze=spec.freeze)
                        fns[lib] = infer_call(m, x, dtype, device)
                if mode == "compile":
                    extra["compile_s"] = {lib: round(_timed_first(fn), 2) for lib, fn in fns.items()}
                if task != "train" and dtype != "fp32":
                    outs = {lib: fn().float() for lib, fn in fns.items()}
                    extra["max_abs_diff"] = float((outs["vitlab"] - outs["timm"]).abs().max())
                reps = spec.latency_reps if task == "latency" else spec.reps
                times = interleaved(fns, reps=reps, warmup=spec.warmup, device=device)
                if task == "train" and mode == "eager" and spec.memory:
                    extra["peak_memory_mb"] = {lib: peak_memory(bm.config, lib, task, dtype, batch, spec)
                                               for lib in LIBS}
                rows.append(result_row(bm, task, dtype, mode, batch, times, flops, peak, **extra))
                log.info("  ratio %.3f", rows[-1].get("ratio", float("nan")))
                del fns
        del models
    for key in spec.onnx_models:
        if key == bm.key:
            rows.append(measure_onnx(bm, base, spec, peaks["fp32"], flops))
    return rows


def measure_onnx(bm: BenchModel, pair: dict[str, nn.Module], spec: BenchSpec, peak: float, flops: int) -> dict:
    """onnxruntime (CPU) running vitlab's export, against timm in eager torch, fp32, batch ``infer_batch``."""
    from vitlab.bench.onnx import check_onnx, export_onnx, ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(pair["vitlab"].cpu(), Path(tmp) / "model.onnx")
        session = ort_session(path, threads=torch.get_num_threads())
        diff = check_onnx(pair["vitlab"].cpu(), path, session=session)
        x = bench_input(bm, bm.infer_batch, "cpu", "fp32")
        feed = {"images": x.numpy()}
        fns = {"vitlab": lambda: session.run(["logits"], feed),
               "timm": infer_call(pair["timm"].cpu(), x, "fp32", "cpu")}
        times = interleaved(fns, reps=spec.reps, warmup=spec.warmup)
    return result_row(bm, "infer", "fp32", "onnxruntime", bm.infer_batch, times, flops, peak, max_abs_diff_onnx=diff)


# ----------------------------------------------------------------------------------------------------- memory
def peak_memory(config: ViTConfig, lib: str, task: str, dtype: str, batch: int, spec: BenchSpec) -> float | None:
    """Peak memory of one training step in MB above the memory held before it (model, optimiser state after
    a first step, input): CUDA max allocated, or on CPU the resident-set high-water mark of a fresh process,
    so one measurement's freed-but-cached memory never hides another's."""
    if torch.device(spec.device).type == "cuda":
        return _peak_memory_here(config, lib, task, dtype, batch, spec.device)["peak_mb"]
    request = json.dumps({"config": config.to_dict(), "lib": lib, "task": task, "dtype": dtype, "batch": batch,
                          "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "vitlab.bench.benchmark", request], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                               # Every allocation above 64 KiB gets its own mapping, returned to the system when
                               # freed: the resident set then follows live tensors instead of malloc's free lists.
                               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    if proc.returncode:
        log.warning("memory measurement failed for %s %s: %s", lib, dtype, proc.stderr[-2000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_memory_here(config: ViTConfig, lib: str, task: str, dtype: str, batch: int, device: str) -> dict:
    from vitlab.bench.timing import current_rss_mb, peak_rss_mb, reset_peak_rss
    from vitlab.model.vit import VisionTransformer

    model = (VisionTransformer(config) if lib == "vitlab" else build_timm(config)).to(device).train()
    bm = BenchModel("memory", config, batch, batch)
    x = bench_input(bm, batch, device, dtype)
    y = torch.randint(0, max(config.num_classes, 1), (batch,), device=device)
    step = train_call(model, x, y, dtype, device)
    step()  # optimiser state exists from here on: part of the baseline, as are weights and the batch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return {"peak_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    base = current_rss_mb() or 0.0
    if not reset_peak_rss():
        log.warning("cannot reset the peak RSS on this system; the peak includes model construction")
    step()
    return {"peak_mb": round(peak_rss_mb() - base, 1), "base_rss_mb": round(base, 1)}


# ------------------------------------------------------------------------------------------------ data pipeline
def data_pipeline(spec: BenchSpec, root: str | Path | None = None) -> dict:
    """Images/s of the training data path for the CIFAR recipe on the bundled sample: decoding every image once
    (the in-memory path), then augment + collate of in-memory batches, and the streamed path that decodes,
    augments and collates each image per batch (DataLoader, ``threads`` workers)."""
    from vitlab.data import sample_root

    root = Path(root) if root is not None else sample_root() / "train"
    out: dict[str, Any] = {"root": str(root)}
    try:
        from vitlab.data.folder import SafeImageFolder, load_in_memory
        from vitlab.data.loaders import FolderBatches, InMemoryBatches
        from vitlab.train.config import load_config
        from vitlab.train.engine import batch_augment, image_transform
    except ImportError as e:  # the training engineer's code; without it torchvision's ImageFolder is measured
        log.warning("vitlab.data/train unavailable (%s); measuring torchvision ImageFolder", e)
        return {**out, **_torchvision_pipeline(root, spec)}
    cfg = load_config("small-scratch")
    threads = torch.get_num_threads()
    start = time.perf_counter()
    data = load_in_memory(root, cfg.image_size, threads=threads)
    n = len(data.labels)
    out["decode_img_s"] = round(n / (time.perf_counter() - start), 1)
    batches = InMemoryBatches(data, batch_augment(cfg), seed=0, num_classes=len(data.classes))
    out["batch"] = batch = min(cfg.batch_size, n)
    steps = min(spec.data_batches, n // batch)
    start = time.perf_counter()
    for i, _ in enumerate(batches.epoch(0, 0, batch)):
        if i + 1 >= steps:
            break
    out["in_memory_augment_img_s"] = round(steps * batch / (time.perf_counter() - start), 1)
    dataset = SafeImageFolder(root, image_transform(cfg), max_side=cfg.image_size)
    stream = FolderBatches(dataset, seed=0, num_classes=len(data.classes), workers=threads, global_batch=batch)
    it = stream.epoch(0, 0, batch)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for i, _ in enumerate(it):
        if i + 1 >= steps:
            break
    out["streamed_img_s"] = round(steps * batch / (time.perf_counter() - start), 1)
    out["workers"] = threads
    del it, stream
    return out


def _torchvision_pipeline(root: Path, spec: BenchSpec) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    t = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize([0.5] * 3, [0.5] * 3)])
    loader = DataLoader(datasets.ImageFolder(root, t), batch_size=128, shuffle=True,
                        num_workers=torch.get_num_threads())
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for i, (x, _) in enumerate(it):
        n += len(x)
        if i + 1 >= spec.data_batches:
            break
    return {"streamed_img_s": round(n / (time.perf_counter() - start), 1), "batch": 128}


# ---------------------------------------------------------------------------------------------------- the run
def run_benchmark(spec: BenchSpec) -> dict:
    """Measure everything ``spec`` asks for; returns ``{"machine", "spec", "peaks", "rows", "data_pipeline"}``."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    started = time.time()
    result: dict[str, Any] = {"machine": machine_info(spec.device), "spec": _spec_dict(spec)}
    result["machine"]["precision_auto"] = resolve("auto", spec.device)
    peaks = _peaks(spec)
    result["peaks_flop_s"] = {"start": peaks}
    rows: list[dict] = []
    for key in spec.models:
        if key in spec.models_override:
            bm = BenchModel(key, spec.models_override[key], spec.infer_batch.get(key, 16),
                            spec.train_batch.get(key, 16))
        else:
            bm = bench_model(key, gelu=spec.gelu, infer_batch=spec.infer_batch.get(key),
                             train_batch=spec.train_batch.get(key))
        for r in measure_model(bm, spec, peaks):
            r["flops_per_image"] = count_flops(bm.config)
            rows.append(r)
    result["rows"] = rows
    if spec.data:
        pipe = data_pipeline(spec)
        train = [r for r in rows if r["model"] == "cifar" and r["task"] == "train"]
        if train:  # the fastest training step measured for the recipe's model is what the data must keep up with
            best = max(train, key=lambda r: r["vitlab_img_s"])
            pipe["train_step_img_s"] = best["vitlab_img_s"]
            pipe["train_step"] = f"{best['dtype']} {best['mode']} batch {best['batch']}"
        result["data_pipeline"] = pipe
    end_peaks = _peaks(spec)
    result["peaks_flop_s"]["end"] = end_peaks
    # MFU against the better of the two peak measurements: load that happened to hit one of them must not
    # inflate utilisation.
    best = {k: max(peaks[k], end_peaks[k]) for k in peaks}
    result["peaks_flop_s"]["used"] = best
    for r in rows:
        if r["mode"] == "onnxruntime" or r["dtype"] == "fp32":
            kind = "fp32"
        else:
            kind = "bf16"
        factor = TRAIN_FLOP_FACTOR if r["task"] == "train" else 1
        for lib in LIBS:
            if f"{lib}_ms" in r:
                r[f"{lib}_mfu"] = round(mfu(factor * r["flops_per_image"] * r["batch"], r[f"{lib}_ms"] / 1e3,
                                            best[kind]), 4)
    result["machine"]["load_average_end"] = machine_info(spec.device)["load_average"]
    result["wall_s"] = round(time.time() - started, 1)
    return result


def _peaks(spec: BenchSpec) -> dict[str, float]:
    """The matmul peaks MFU is measured against: fp32 always, bf16 when a bf16 row is asked for (emulated bf16, on
    a CPU without it, takes minutes for the 2048^3 matmul)."""
    peaks = {"fp32": matmul_peak(torch.float32, n=spec.peak_n, device=spec.device)}
    if any(d.startswith("bf16") for d in spec.dtypes):
        peaks["bf16"] = matmul_peak(torch.bfloat16, n=spec.peak_n, device=spec.device)
    return peaks


def _spec_dict(spec: BenchSpec) -> dict:
    d = asdict(spec)
    d["models_override"] = {k: v.to_dict() for k, v in spec.models_override.items()}
    return d


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table (throughput in images/s; latency rows in ms)."""
    head = (f"{'model':<10} {'task':<8} {'dtype':<14} {'mode':<11} {'batch':>5} {'vitlab':>10} {'timm':>10} "
            f"{'ratio':>6} {'MFU v':>6} {'MFU t':>6}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        unit = "ms" if r["task"] == "latency" else "img/s"
        v = r["vitlab_ms"] if unit == "ms" else r["vitlab_img_s"]
        t = r["timm_ms"] if unit == "ms" else r["timm_img_s"]
        lines.append(f"{r['model']:<10} {r['task']:<8} {r['dtype']:<14} {r['mode']:<11} {r['batch']:>5} "
                     f"{v:>8.2f}{unit[:2]:>2} {t:>8.2f}{unit[:2]:>2} {r.get('ratio', float('nan')):>6.2f} "
                     f"{100 * r['vitlab_mfu']:>5.1f}% {100 * r['timm_mfu']:>5.1f}%")
    peaks = result["peaks_flop_s"].get("used", result["peaks_flop_s"]["start"])
    rates = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    lines.append(f"matmul peak {result['spec']['peak_n']}^3: {rates}; ratio = vitlab speed / timm speed "
                 f"(>1: vitlab faster); precision auto here: {result['machine'].get('precision_auto')}")
    mem = [r for r in result["rows"] if r.get("peak_memory_mb")]
    for r in mem:
        m = r["peak_memory_mb"]
        lines.append(f"train peak memory {r['model']} {r['dtype']} batch {r['batch']}: vitlab {m['vitlab']} MB, "
                     f"timm {m['timm']} MB")
    if "data_pipeline" in result:
        lines.append("data pipeline: " + ", ".join(f"{k}={v}" for k, v in result["data_pipeline"].items()
                                                    if k != "root"))
    lines.append(f"threads {result['machine']['torch_threads']}, load average {result['machine']['load_average']}"
                 f" -> {result['machine'].get('load_average_end')}")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The rows as a Markdown table for the docs (throughput in images/s, latency in ms, MFU in %)."""
    lines = ["| model | task | dtype | mode | batch | vitlab | timm | vitlab/timm | MFU vitlab | MFU timm |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["task"] == "latency":
            v, t = f"{r['vitlab_ms']:.1f} ms", f"{r['timm_ms']:.1f} ms"
        else:
            v, t = f"{r['vitlab_img_s']:.1f}/s", f"{r['timm_img_s']:.1f}/s"
        mode = r["mode"] if r["mode"] != "onnxruntime" else "onnxruntime (vitlab) vs eager (timm)"
        lines.append(f"| {r['model']} | {r['task']} | {r['dtype']} | {mode} | {r['batch']} | {v} | {t} | "
                     f"**{r.get('ratio', float('nan')):.2f}** | {100 * r['vitlab_mfu']:.0f}% | "
                     f"{100 * r['timm_mfu']:.0f}% |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    """Write ``result`` to ``path`` atomically (``vitlab.io``)."""
    return io.write_json(path, result)


if __name__ == "__main__":  # the child process of :func:`peak_memory`
    req = json.loads(sys.argv[1])
    torch.set_num_threads(req["threads"])
    res = _peak_memory_here(ViTConfig.from_dict(req["config"]), req["lib"], req["task"], req["dtype"], req["batch"],
                            "cpu")
    print(json.dumps(res))
