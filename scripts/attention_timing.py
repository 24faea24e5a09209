"""Time of one bf16 attention call on CPU, for the shapes the benchmarks and the small-scratch preset run: forward +
backward of SDPA's fused kernel against vitlab's ``_ReducedPrecisionAttention`` (sliced forward, recomputing
backward) at several backward slice sizes, and the inference forward alone, SDPA against ``_sliced_attention`` at
several forward slice sizes. Writes JSON.

    python scripts/attention_timing.py --out results/bench/attention.json [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.model import layers
from vitlab.model.layers import _ReducedPrecisionAttention, _sliced_attention

# (batch, tokens, heads, head dim): ViT-S/16, ViT-Ti/16 and ViT-B/16 at 224 with the bench's training batches, and
# the CIFAR preset's model at 32 px and 24 px (its first 80%).
SHAPES = [(16, 197, 6, 64), (32, 197, 3, 64), (4, 197, 12, 64), (128, 64, 4, 32), (128, 36, 4, 32)]
SLICES = [2**16, 2**18, 2**20]
FORWARD_SLICES = [2**18, 2**20, 2**22]


def time_ms(fn, base: torch.Tensor, grad: torch.Tensor, reps: int) -> float:
    def run() -> None:
        qkv = base.clone().requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, N, hd: views of one qkv tensor, as the model's
        fn(q, k, v).backward(grad)

    for _ in range(2):
        run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def forward_ms(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            fn(q, k, v)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    backward_default, forward_default = layers._BACKWARD_ELEMENTS, layers._FORWARD_ELEMENTS
    for batch, tokens, heads, hd in SHAPES:
        base = torch.randn(batch, tokens, 3, heads, hd, dtype=torch.bfloat16)
        grad = torch.randn(batch, heads, tokens, hd, dtype=torch.bfloat16)
        row = {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": hd,
               "fused_sdpa_ms": time_ms(F.scaled_dot_product_attention, base, grad, args.reps)}
        for elements in SLICES:
            layers._BACKWARD_ELEMENTS = elements
            row[f"recompute_slices_{elements}_ms"] = time_ms(_ReducedPrecisionAttention.apply, base, grad, args.reps)
        layers._BACKWARD_ELEMENTS = backward_default
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        row["forward_sdpa_ms"] = forward_ms(F.scaled_dot_product_attention, q, k, v, args.reps)
        for elements in FORWARD_SLICES:
            layers._FORWARD_ELEMENTS = elements
            row[f"forward_sliced_{elements}_ms"] = forward_ms(_sliced_attention, q, k, v, args.reps)
        layers._FORWARD_ELEMENTS = forward_default
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"threads": args.threads, "torch": torch.__version__, "reps": args.reps,
           "forward_elements": forward_default, "backward_elements": backward_default, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
