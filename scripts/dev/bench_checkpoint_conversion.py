"""Time and peak memory of converting a ViT-B/16-sized checkpoint (86M parameters, 344 MB in float32) between
formats on the CPU, each conversion in a fresh process so its peak RSS is its own.

    .venv/bin/python scripts/dev/bench_checkpoint_conversion.py [--out results/checkpoints/convert_vit_b16.json]

The source is a random-weight ViT-B/16 written in the official vit_jax ``.npz`` layout (what ``ViT-B_16.npz``
holds); then npz -> vitlab, vitlab -> timm, timm -> hf, hf -> npz run as ``vitlab.checkpoints.convert`` calls.
"Copies" is (peak RSS - RSS after imports) / weights size: how many copies of the weights were alive at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads({threads})
import vitlab.checkpoints as ck
import vitlab.checkpoints.official_npz, vitlab.checkpoints.timm, vitlab.checkpoints.hf, vitlab.checkpoints.native
import safetensors.torch, numpy

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

# Reset the peak-RSS mark (VmHWM) after the imports: a child of a big process starts with its parent's mark.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
ck.convert({src!r}, {dst!r}, src_format={src_format!r}, dst_format={dst_format!r}, model={model!r})
seconds = time.perf_counter() - t0
print(json.dumps(dict(seconds=seconds, rss_after_imports=base, peak_rss=status("VmHWM"))))
"""


def run_child(src: Path, dst: Path, src_format: str, dst_format: str, model: object, threads: int) -> dict:
    code = CHILD.format(src=str(src), dst=str(dst), src_format=src_format, dst_format=dst_format, model=model,
                        threads=threads)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/checkpoints/convert_vit_b16.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import vitlab

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = vitlab.create_model("ViT-B/16")
        n_params = sum(p.numel() for p in model.parameters())
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        vitlab.save(model, tmp / "vit_b16.npz", format="npz")
        del model
        steps = [
            ("npz", tmp / "vit_b16.npz", "vitlab", tmp / "vit_b16.safetensors", None),
            ("vitlab", tmp / "vit_b16.safetensors", "timm", tmp / "timm.safetensors", None),
            ("timm", tmp / "timm.safetensors", "hf", tmp / "hf", "ViT-B/16"),
            ("hf", tmp / "hf", "npz", tmp / "back.npz", None),
        ]
        rows = []
        for src_format, src, dst_format, dst, spec in steps:
            load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
            r = run_child(src, dst, src_format, dst_format, spec, args.threads)
            r.update(src_format=src_format, dst_format=dst_format, load_average_1min=load_before,
                     copies=(r["peak_rss"] - r["rss_after_imports"]) / weights_bytes)
            rows.append(r)
            print(f"{src_format:>6} -> {dst_format:<6} {r['seconds']:6.2f} s  peak RSS {r['peak_rss'] / 2**20:7.0f} MiB"
                  f"  (+{(r['peak_rss'] - r['rss_after_imports']) / 2**20:.0f} MiB = {r['copies']:.2f} copies)")
        import numpy as np

        a, b = np.load(tmp / "vit_b16.npz"), np.load(tmp / "back.npz")
        exact = sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    result = {
        "model": "ViT-B/16", "parameters": n_params, "weights_bytes": weights_bytes, "dtype": "float32",
        "device": "cpu", "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "round_trip_bit_exact": exact, "conversions": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"npz -> vitlab -> timm -> hf -> npz bit-exact: {exact}; wrote {args.out}")


if __name__ == "__main__":
    main()
