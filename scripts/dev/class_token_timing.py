"""What computing only the class token in the last block saves at inference: ``model(x)`` (the last block computes
the class token's row alone) against ``model.forward_head(model.forward_features(x))`` (every block on every
token, what timm computes), the same model, weights and input, interleaved, medians. The logits are compared first.
Writes JSON; run it with the machine otherwise idle.

    python scripts/dev/class_token_timing.py --precision bf16 --out results/bench/class-token-last-block-bf16-avx512bf16-amx.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python scripts/dev/class_token_timing.py --precision fp32 --out results/bench/class-token-last-block-fp32-avx2sim.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vitlab import io, precision
from vitlab.model import create_model, fast

CASES = [("ViT-S/16", 8), ("ViT-S/16", 1), ("ViT-B/16", 8), ("ViT-B/16", 1)]


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (the avx512-bf16 path's inference)")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, batch in CASES:
        torch.manual_seed(0)
        model = create_model(name, gelu="exact").eval()  # the benchmark's function (timm's GELU)
        torch.nn.init.normal_(model.head.weight, std=0.02)  # the fresh head is zero: make the logits comparable
        x = torch.randn(batch, 3, 224, 224)
        short = lambda: model(x)  # noqa: E731
        full = lambda: model.forward_head(model.forward_features(x))  # noqa: E731
        with torch.no_grad(), precision.autocast(args.precision, torch.device("cpu")):
            diff = (short().float() - full().float()).abs().max().item()
            for _ in range(2):
                short(), full()
            t_short, t_full = [], []
            for _ in range(args.reps):
                t_short.append(seconds(short))
                t_full.append(seconds(full))
        row = {"model": name, "batch": batch, "short_ms": 1e3 * statistics.median(t_short),
               "full_ms": 1e3 * statistics.median(t_full), "max_abs_logit_diff": diff}
        row["speedup"] = row["full_ms"] / row["short_ms"]
        rows.append(row)
        print(f"{name} batch {batch}: every token {row['full_ms']:.1f} ms, class token in the last block "
              f"{row['short_ms']:.1f} ms, {row['speedup']:.3f}x (logits differ by {diff:.1e})", flush=True)
    record = {"precision": args.precision, "cpu_capability": precision.cpu_capability(), "cpu_path": fast.cpu_path(),
              "threads": args.threads, "reps": args.reps, "torch": torch.__version__, "rows": rows}
    io.write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
