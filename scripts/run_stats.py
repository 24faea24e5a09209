"""Test top-1 of finished training runs and their mean ± sample standard deviation, from each run's final.json;
for a run with low-resolution phases, also each phase's training rate and epochs, from the time stamps in its
metrics.jsonl (a log interval counts for the phase its start falls in, by the share of the logged time that the
config's ``low_res_fraction`` gives each phase; evaluations in between blur the boundaries a little).

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
        print_phases(Path(d))
    sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
    print(f"{len(top1)} runs: mean {statistics.mean(top1):.2f} ± {sd:.2f}% (min {min(top1):.2f}, max {max(top1):.2f})")


def print_phases(run: Path) -> None:
    config, metrics = run / "config.json", run / "metrics.jsonl"
    if not (config.is_file() and metrics.is_file()):
        return
    from vitlab.train.config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads(config.read_text()))
    stages = cfg.resolution_stages()
    if len(stages) < 2:
        return
    logs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logs = [m for m in logs if "loss" in m and "split" not in m and "time" in m]
    if len(logs) < 2:
        return
    t0, span = logs[0]["time"], logs[-1]["time"] - logs[0]["time"]
    spe = logs[-1]["step"] / logs[-1]["epoch"]
    totals = [[0, 0.0] for _ in stages]  # steps, seconds
    for a, b in zip(logs, logs[1:]):
        share = (a["time"] - t0) / span
        i = next(k for k, (_, end) in enumerate(stages) if share < end or k == len(stages) - 1)
        totals[i][0] += b["step"] - a["step"]
        totals[i][1] += b["time"] - a["time"]
    for (size, _), (steps, seconds) in zip(stages, totals):
        if seconds:
            print(f"  {size} px: {steps * cfg.batch_size / seconds:.0f} img/s, {steps / spe:.1f} epochs")


if __name__ == "__main__":
    main(sys.argv[1:])
