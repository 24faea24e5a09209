"""How fast a ViT could possibly run on this CPU in bf16: time only the model's matrix multiplies.

Every FLOP that the benchmark counts (``vitlab.bench.flops``) is in a matmul: the patch projection, qkv, the two
attention products, the output projection, the MLP and the head. This script runs exactly those matmuls, with the
shapes of one forward (and, for training, of the backward too: two matmuls per Dense layer, four per attention),
in bf16, each through the faster of plain ``torch.matmul`` and the prepacked oneDNN call that vitlab's inference
uses, and nothing else: no LayerNorm, GELU, softmax, residual adds, casts, optimiser or Python. Its time is a lower
bound on any implementation's time built on these kernels, so

- ``gemm_mfu`` (the model's FLOPs over that time, over the 2048x2048 matmul peak) is the highest MFU reachable;
- ``max_speedup_over_timm`` (timm's measured time over that time) is the highest vitlab/timm ratio reachable.

vitlab, timm and the matmuls alone are timed interleaved in one process (medians), as ``vitlab bench`` does.

    python scripts/dev/gemm_ceiling.py --out results/bench/gemm-ceiling-bf16-vits16-vitb16-avx512bf16.json [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from vitlab.bench.benchmark import bench_input, cast_models, infer_call, train_call
from vitlab.bench.flops import count_flops, matmul_shapes
from vitlab.bench.models import bench_model, build_pair
from vitlab.bench.timing import interleaved, machine_info, matmul_peak, median
from vitlab.model.config import ViTConfig

BF16 = torch.bfloat16


def _fastest(candidates: list[Callable[[], torch.Tensor]], reps: int = 5) -> Callable[[], torch.Tensor]:
    times = interleaved({str(i): fn for i, fn in enumerate(candidates)}, reps=reps)
    return candidates[min(range(len(candidates)), key=lambda i: median(times[str(i)]))]


def _matmul(m: int, k: int, n: int, prepacked: bool) -> list[Callable[[], torch.Tensor]]:
    a = torch.randn(m, k).to(BF16)
    w = torch.randn(n, k).to(BF16)
    calls = [lambda: torch.matmul(a, w.t())]
    if prepacked and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        calls.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    return calls


def gemm_calls(cfg: ViTConfig, batch: int, training: bool) -> list[tuple[int, Callable[[], torch.Tensor]]]:
    """(count, call) for every matmul of a forward (``matmul_shapes``), plus the backward's when ``training``."""
    calls = []
    for i, (count, b, m, k, n) in enumerate(matmul_shapes(cfg, batch)):
        if b == 1:  # a Dense layer over all tokens
            calls.append((count, _fastest(_matmul(m, k, n, prepacked=True))))
            if training and i > 0:  # the patch projection's input (the image) needs no gradient
                calls.append((count, _fastest(_matmul(m, n, k, prepacked=False))))  # dX = dY W: M x N @ N x K
            if training:
                calls.append((count, _fastest(_matmul(n, m, k, prepacked=False))))  # dW = dYᵀ X: N x M @ M x K
        else:  # q kᵀ or p v, per image and head
            x, y = torch.randn(b, m, k).to(BF16), torch.randn(b, k, n).to(BF16)
            calls.append((count * (3 if training else 1), lambda x=x, y=y: torch.bmm(x, y)))
            # (each product's two gradients have its FLOPs; timed at the product's own shape)
    return calls


def measure(key: str, batch: int | None, training: bool, reps: int, peak: float) -> dict:
    bm = bench_model(key, infer_batch=batch, train_batch=batch)
    batch = bm.train_batch if training else bm.infer_batch
    cfg = bm.config
    gemms = gemm_calls(cfg, batch, training)

    def gemms_only() -> None:
        for count, call in gemms:
            for _ in range(count):
                call()

    flops = count_flops(cfg) * batch * (3 if training else 1)
    rows = {}
    dtypes = ["bf16-autocast"] if training else ["bf16-autocast", "bf16-weights"]
    for dtype in dtypes:
        torch.manual_seed(0)
        vit, tm = cast_models(dict(zip(("vitlab", "timm"), build_pair(cfg))), dtype).values()
        x = bench_input(bm, batch, "cpu", dtype)
        if training:
            y = torch.randint(0, cfg.num_classes, (batch,))
            fns = {"vitlab": train_call(vit.train(), x, y, dtype, "cpu"),
                   "timm": train_call(tm.train(), x, y, dtype, "cpu")}
        else:
            fns = {"vitlab": infer_call(vit.eval(), x, dtype, "cpu"), "timm": infer_call(tm.eval(), x, dtype, "cpu")}
        fns["matmuls only"] = gemms_only
        times = {name: median(v) for name, v in interleaved(fns, reps=reps, warmup=2).items()}
        rows[dtype] = {
            **{f"{name}_ms": round(t * 1e3, 2) for name, t in times.items()},
            **{f"{name}_mfu": round(flops / t / peak, 3) for name, t in times.items()},
            "vitlab_over_timm": round(times["timm"] / times["vitlab"], 3),
            "max_speedup_over_timm": round(times["timm"] / times["matmuls only"], 3),
        }
    return {"model": key, "task": "train" if training else "infer", "batch": batch, "flops": flops, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak(BF16)
    results = [measure("ViT-S/16", None, False, args.reps, peak), measure("ViT-B/16", 4, False, args.reps, peak),
               measure("ViT-S/16", 16, True, args.reps, peak)]
    out = {"machine": machine_info(), "threads": args.threads, "bf16_matmul_peak_gflops": round(peak / 1e9, 1),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in results:
        for dtype, row in r["rows"].items():
            print(f"{r['model']:9s} {r['task']:5s} b{r['batch']:<3d} {dtype:14s} " + "  ".join(
                f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
