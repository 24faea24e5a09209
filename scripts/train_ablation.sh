#!/usr/bin/env bash
# The small-data recipe's ingredients one at a time, each a 5-minute wall-clock run of a width-128, depth-4, patch-4
# ViT (scripts/ablation-base.yaml) on the full CIFAR-10 folder, evaluated on its 2k test images (at the model's
# resolution: 24 px for the runs that set image_size=24). Needs the CPU to itself.
# Usage: bash scripts/train_ablation.sh [DATA] [OUT]   -> OUT/summary.md and one folder per run (metrics, final.json)
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${2:-results/train/ablation-5min-avx512bf16-cifar10}
BASE=$(dirname "$0")/ablation-base.yaml
VITLAB=${VITLAB:-vitlab}
mkdir -p "$OUT"
run() {  # name, then --set overrides on top of the base
  local name=$1; shift
  local dir
  dir=$(mktemp -d)
  "$VITLAB" train --config "$BASE" --data "$DATA" --out "$dir/run" --set budget_minutes=5 --set epochs=1000 \
    --set eval_every=0 --json "$@" > "$dir/final.json"
  mkdir -p "$OUT/$name"
  cp "$dir/final.json" "$dir/run/metrics.jsonl" "$dir/run/config.json" "$OUT/$name/"
  if [ "${KEEP_RUNS:-0}" = 1 ]; then cp "$dir/run/model.safetensors" "$OUT/$name/"; fi
  rm -rf "$dir"
  echo "$name $*" >> "$OUT/commands.txt"
}
rm -f "$OUT/commands.txt"
run A-base
run B-sincos          --set model_overrides.pos_embed=sincos-2d
run C-pad-crop        --set crop=pad
run D-batch-64        --set batch_size=64
run E-24px            --set image_size=24
run F-sincos-mimetic  --set model_overrides.pos_embed=sincos-2d --set attention_init=mimetic
run G-sincos-compile  --set model_overrides.pos_embed=sincos-2d --set compile=true
run H-sincos-pad-24px --set model_overrides.pos_embed=sincos-2d --set crop=pad --set image_size=24
run I-all             --set model_overrides.pos_embed=sincos-2d --set crop=pad --set attention_init=mimetic \
                      --set low_res_size=24 --set low_res_fraction=0.8
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| run | overrides on `scripts/ablation-base.yaml` | epochs | img/s | test top-1 |", "|---|---|---|---|---|"]
for line in (out / "commands.txt").read_text().splitlines():
    name, _, sets = line.partition(" ")
    r = json.loads((out / name / "final.json").read_text())
    rows.append(f"| {name} | `{sets or '(none)'}` | {r['epochs']:.1f} | {r['train_img_per_s']:.0f} | {r['top1']:.1f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
