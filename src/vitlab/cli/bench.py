"""``vitlab bench``: vitlab against timm on this machine (throughput, latency, training, memory, MFU), written as
JSON and printed as a table. A thin layer over :func:`vitlab.bench.benchmark.run_benchmark`."""

from __future__ import annotations

import argparse

from vitlab.bench.benchmark import DTYPES, MODES, TASKS
from vitlab.cli.common import output_file


def _csv(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        if choices is not None:
            bad = [s for s in items if s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown value(s) {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def _batches(text: str) -> dict[str, int]:
    """``ViT-B/16=8,cifar=256`` -> {"ViT-B/16": 8, "cifar": 256}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.rpartition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected MODEL=BATCH items, got {item!r}")
        out[key] = int(value)
    return out


def run(args: argparse.Namespace) -> int:
    from vitlab.bench.benchmark import BenchSpec, format_table, run_benchmark, write_json

    if args.out:
        output_file(args.out)  # before the (long) measurements
    spec = BenchSpec(
        models=args.models, dtypes=args.dtypes, modes=args.modes, tasks=args.tasks, reps=args.reps,
        latency_reps=args.latency_reps, warmup=args.warmup, threads=args.threads, device=args.device,
        compile_models=args.compile_models, compile_tasks=args.compile_tasks, train_models=args.train_models,
        infer_batch=args.infer_batch, train_batch=args.train_batch, memory=not args.no_memory,
        onnx_models=args.onnx_models, data=not args.no_data, peak_n=args.peak_n, freeze=not args.no_freeze,
    )
    result = run_benchmark(spec)
    if args.out:
        write_json(result, args.out)
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark vitlab against timm (same weights, interleaved runs) and write JSON",
        description="Inference throughput, batch-1 latency, training steps, peak memory and MFU of vitlab and "
                    "timm's matching models, measured in one process with interleaved repetitions.",
    )
    p.add_argument("--models", type=_csv(), default=("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "cifar"),
                   help="comma-separated model names, 'cifar' for the small-scratch recipe's model")
    p.add_argument("--dtypes", type=_csv(DTYPES), default=DTYPES, help=f"subset of {','.join(DTYPES)}")
    p.add_argument("--modes", type=_csv(MODES), default=MODES, help=f"subset of {','.join(MODES)}")
    p.add_argument("--tasks", type=_csv(TASKS), default=TASKS, help=f"subset of {','.join(TASKS)}")
    p.add_argument("--compile-models", type=_csv(), default=None, help="models that get compile rows (default all)")
    p.add_argument("--compile-tasks", type=_csv(TASKS), default=("infer", "train"))
    p.add_argument("--train-models", type=_csv(), default=None, help="models that get training rows (default all)")
    p.add_argument("--onnx-models", type=_csv(), default=(), help="models also run through onnxruntime (fp32)")
    p.add_argument("--infer-batch", type=_batches, default={}, help="e.g. ViT-B/16=8,cifar=256")
    p.add_argument("--train-batch", type=_batches, default={}, help="e.g. ViT-S/16=16")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (median reported)")
    p.add_argument("--latency-reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the matmul whose rate is the MFU peak")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline measurement")
    p.add_argument("--no-freeze", action="store_true", help="compile inference without inductor freezing")
    p.add_argument("--out", default=None, help="JSON file to write (e.g. results/bench/cpu.json)")
    p.set_defaults(func=run)
