"""Forward + backward time of one bf16 attention call on CPU: SDPA's fused kernel against vitlab's recomputing
backward (``_ReducedPrecisionAttention``) at several slice sizes, for the shapes the benchmarks train. Writes JSON.

    python scripts/attention_backward_timing.py --out results/bench/attention_backward.json [--threads 2]
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
from vitlab.model.layers import _ReducedPrecisionAttention

# (batch, tokens, heads, head dim): ViT-S/16, ViT-Ti/16 and ViT-B/16 at 224 with the bench's training batches, and
# the CIFAR preset's model at 32 px.
SHAPES = [(16, 197, 6, 64), (32, 197, 3, 64), (4, 197, 12, 64), (128, 64, 4, 32)]
SLICES = [2**16, 2**18, 2**20]


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch, tokens, heads, hd in SHAPES:
        base = torch.randn(batch, tokens, 3, heads, hd, dtype=torch.bfloat16)
        grad = torch.randn(batch, heads, tokens, hd, dtype=torch.bfloat16)
        row = {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": hd,
               "fused_sdpa_ms": time_ms(F.scaled_dot_product_attention, base, grad, args.reps)}
        for elements in SLICES:
            layers._BACKWARD_ELEMENTS = elements
            row[f"recompute_slices_{elements}_ms"] = time_ms(_ReducedPrecisionAttention.apply, base, grad, args.reps)
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"threads": args.threads, "torch": torch.__version__, "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
