"""Where a model's CPU inference time goes: ``torch.profiler`` over a few forwards of vitlab's model, as the
benchmark runs it (same model, input and autocast), printed as a table of ops by self time.

    python scripts/dev/profile_inference.py [--model ViT-S/16] [--batch 16] [--dtype bf16-autocast] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.bench.benchmark import bench_input, cast_models, infer_call
from vitlab.bench.models import bench_model, build_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-S/16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="bf16-autocast", choices=["fp32", "bf16-autocast", "bf16-weights"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bm = bench_model(args.model, infer_batch=args.batch)
    model = cast_models({"vitlab": build_pair(bm.config)[0]}, args.dtype)["vitlab"].eval()
    x = bench_input(bm, args.batch, "cpu", args.dtype)
    call = infer_call(model, x, args.dtype, "cpu")
    for _ in range(3):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            call()
    print(f"{args.model} batch {args.batch} {args.dtype}, {args.threads} threads, {args.calls} forwards:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))


if __name__ == "__main__":
    main()
