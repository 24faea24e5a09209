"""Time of vitlab's C++ tanh GELU and bf16-output LayerNorm (``vitlab.model.cpu_kernels``) against the PyTorch ops
they replace, forward and backward, at the activation shapes of ViT-S/16 (batch 16) and of the small-scratch
preset's model (batch 128, 32 px). Writes JSON.

    python scripts/dev/kernel_timing.py --out results/bench/gelu-layernorm-op-bf16-fp32-avx512bf16.json \
        [--threads 2] [--reps 21]

Each row's calls are timed interleaved (A B C, C B A, ...), medians. GELU rows: PyTorch's tanh GELU, PyTorch's
erf GELU (for scale) and the kernel, in bf16 and fp32. LayerNorm rows: what autocast runs (fp32 LayerNorm, then the
cast to bf16; the gradient cast back to fp32, then LayerNorm's backward) and the kernel, which writes and reads the
bf16 directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.bench.timing import interleaved, median
from vitlab.model import cpu_kernels

GELU_SHAPES = {"ViT-S/16 MLP hidden (16, 197, 1536)": (16, 197, 1536),
               "CIFAR model MLP hidden (128, 64, 256)": (128, 64, 256)}
NORM_SHAPES = {"ViT-S/16 (16, 197, 384)": (16, 197, 384), "CIFAR model (128, 64, 128)": (128, 64, 128)}


def ms(fns: dict, reps: int) -> dict[str, float]:
    """Median ms per call of each function, timed interleaved (``vitlab.bench.timing.interleaved``)."""
    return {name: median(ts) * 1e3 for name, ts in interleaved(fns, reps=reps, warmup=3).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernel = cpu_kernels.kernels()
    if kernel is None:
        raise SystemExit("the C++ kernels could not be built here; nothing to compare")
    rows = []
    for name, shape in GELU_SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(shape).to(dtype)
            g = torch.randn(shape).to(dtype)
            row = {"op": "gelu", "shape": name, "dtype": str(dtype).removeprefix("torch.")}
            row.update(ms({"torch_tanh_forward_ms": lambda: F.gelu(x, approximate="tanh"),
                           "torch_tanh_backward_ms": lambda: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
                           "torch_erf_forward_ms": lambda: F.gelu(x),
                           "torch_erf_backward_ms": lambda: torch.ops.aten.gelu_backward(g, x),
                           "kernel_forward_ms": lambda: kernel.gelu_tanh_forward(x),
                           "kernel_backward_ms": lambda: kernel.gelu_tanh_backward(g, x)}, args.reps))
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    for name, shape in NORM_SHAPES.items():
        D = shape[-1]
        x, w, b = torch.randn(shape), torch.randn(D), torch.randn(D)
        g = torch.randn(shape).bfloat16()
        _, mean, rstd = kernel.layer_norm_bf16_forward(x, w, b, 1e-6)
        stats = mean.view(*shape[:-1], 1), rstd.view(*shape[:-1], 1)
        row = {"op": "layer_norm", "shape": name}
        row.update(ms({"autocast_forward_ms": lambda: F.layer_norm(x, (D,), w, b, 1e-6).to(torch.bfloat16),
                       "autocast_backward_ms": lambda: torch.ops.aten.native_layer_norm_backward(
                           g.float(), x, (D,), *stats, w, b, [True, True, True]),
                       "kernel_forward_ms": lambda: kernel.layer_norm_bf16_forward(x, w, b, 1e-6),
                       "kernel_backward_ms": lambda: kernel.layer_norm_bf16_backward(g, x, w, mean, rstd)}, args.reps))
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"threads": args.threads, "torch": torch.__version__, "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
