"""Time of one bf16 attention call on CPU, for the shapes the benchmarks and the small-scratch preset run: PyTorch's
fused SDPA kernel, vitlab's torch-op path (``_sliced_attention`` forward, recomputing sliced backward) and vitlab's
C++ kernel (``vitlab.model.cpu_kernels``), forward + backward and the inference forward alone. Writes JSON.

    python scripts/dev/attention_timing.py --out results/bench/attention-op-bf16-avx512bf16.json [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.model import cpu_kernels, layers
from vitlab.model.layers import _ReducedPrecisionAttention, _short_attention

# (batch, tokens, heads, head dim): ViT-S/16, ViT-Ti/16 and ViT-B/16 at 224 with the bench's training batches, and
# the CIFAR preset's model at 32 px and 24 px (its first 80%).
SHAPES = [(16, 197, 6, 64), (32, 197, 3, 64), (4, 197, 12, 64), (128, 64, 4, 32), (128, 36, 4, 32)]


def sdpa(qkv: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*layers._split_heads(qkv))


def time_ms(fn, base: torch.Tensor, grad: torch.Tensor, reps: int) -> float:
    def run() -> None:
        fn(base.clone().requires_grad_()).backward(grad)  # fn takes qkv (B, N, 3, H, hd), as the model calls it

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
    kernel = cpu_kernels.kernels()
    if kernel is None:
        raise SystemExit("the C++ kernel could not be built here; nothing to compare")
    for batch, tokens, heads, hd in SHAPES:
        base = torch.randn(batch, tokens, 3, heads, hd, dtype=torch.bfloat16)
        grad = torch.randn(batch, heads, tokens, hd, dtype=torch.bfloat16)
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        row = {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": hd,
               "fused_sdpa_ms": time_ms(sdpa, base, grad, args.reps),
               "forward_sdpa_ms": forward_ms(F.scaled_dot_product_attention, q, k, v, args.reps)}
        for name, module in (("torch_ops", None), ("kernel", kernel)):
            cpu_kernels._state["module"] = module  # the model's own dispatch, with the kernel off or on
            row[f"{name}_ms"] = time_ms(_ReducedPrecisionAttention.apply, base, grad, args.reps)
            row[f"forward_{name}_ms"] = forward_ms(_short_attention, q, k, v, args.reps)
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"threads": args.threads, "torch": torch.__version__, "reps": args.reps,
           "torch_ops_slice_elements": {"forward": layers._FORWARD_ELEMENTS, "backward": layers._BACKWARD_ELEMENTS},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
