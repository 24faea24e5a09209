"""Time of one attention call on the CPU, forward + backward and the inference forward alone, for the shapes the
benchmarks and the small-scratch preset run: PyTorch's fused SDPA kernel against the attention
``vitlab.model.fast`` takes for the dtype. bf16 (AVX512-BF16 CPUs): ``fast.SlicedAttention`` (the C++ kernel where it
is built) and the torch-op forward ``fast.sliced_attention``; fp32 (the avx2 path): the C++ ``fast.Fp32Attention``.
Writes JSON.

    python scripts/dev/attention_timing.py --dtype bf16 --out results/bench/attention-op-bf16-avx512bf16.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python scripts/dev/attention_timing.py --dtype fp32 --out results/bench/attention-op-fp32-avx2sim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab import precision
from vitlab.model import cpu_kernels, fast

# (batch, tokens, heads, head dim): ViT-S/16, ViT-Ti/16 and ViT-B/16 at 224 with the bench's training batches, and
# the CIFAR preset's model at 32 px and 24 px (its first 80%).
SHAPES = [(16, 197, 6, 64), (32, 197, 3, 64), (4, 197, 12, 64), (128, 64, 4, 32), (128, 36, 4, 32)]


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.dtype == "fp32":
        kernel = cpu_kernels.fp32_kernels()
        ours = lambda qkv: fast.Fp32Attention.apply(qkv, kernel)  # noqa: E731
        ours_forward = lambda qkv: kernel.attention_forward(qkv, qkv.shape[-1] ** -0.5)  # noqa: E731
    else:
        kernel = cpu_kernels.kernels()
        ours = fast.SlicedAttention.apply
        ours_forward = lambda qkv: fast.sliced_attention(*fast.split_heads(qkv))  # noqa: E731
    if kernel is None:
        raise SystemExit(f"vitlab's {args.dtype} CPU kernels cannot be built here; nothing to compare")
    rows = []
    for batch, tokens, heads, hd in SHAPES:
        base = torch.randn(batch, tokens, 3, heads, hd, dtype=dtype)
        grad = torch.randn(batch, heads, tokens, hd, dtype=dtype)

        def train(fn):
            return lambda: fn(base.clone().requires_grad_()).backward(grad)

        def infer(fn):
            def run():
                with torch.no_grad():
                    fn(base)
            return run

        sdpa = lambda qkv: F.scaled_dot_product_attention(*fast.split_heads(qkv))  # noqa: E731
        row = {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": hd,
               "sdpa_ms": median_ms(train(sdpa), args.reps), "vitlab_ms": median_ms(train(ours), args.reps),
               "forward_sdpa_ms": median_ms(infer(sdpa), args.reps),
               "forward_vitlab_ms": median_ms(infer(ours_forward), args.reps)}
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"dtype": args.dtype, "threads": args.threads, "torch": torch.__version__, "reps": args.reps,
           "cpu_capability": precision.cpu_capability(), "cpu_path": fast.cpu_path(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
