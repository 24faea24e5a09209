"""Test top-1 of finished training runs and their mean ± sample standard deviation, from each run's final.json.

    python scripts/run_stats.py results/train/small-scratch-torch-ops-avx512bf16-seed{1,2,3,4}-cifar10
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(run_dirs: list[str]) -> None:
    if not run_dirs:
        sys.exit(__doc__)
    top1 = []
    for d in run_dirs:
        final = Path(d) / "final.json"
        if not final.is_file():
            sys.exit(f"{final}: missing; expected the final.json that `vitlab train` writes into its run directory")
        r = json.loads(final.read_text())
        top1.append(r["top1"])
        print(f"{d}: top1 {r['top1']:.2f}%  epochs {r['epochs']:.1f}  {r['train_img_per_s']:.1f} img/s")
    sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
    print(f"{len(top1)} runs: mean {statistics.mean(top1):.2f} ± {sd:.2f}% (min {min(top1):.2f}, max {max(top1):.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
