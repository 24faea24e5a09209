#!/usr/bin/env bash
# CIFAR-10 resolution demonstration (docs/study.md, "Resolution"): pre-train the study ViT (patch 4) at 32 px (64
# tokens), fine-tune at 32, 48 and 64 px (64, 144, 256 tokens) with the position embedding interpolated in 2D and
# kept in place without interpolation, against training from scratch at 48 and 64 px for the same FLOPs.
# Plan: about 30 minutes of the 2-core CPU (fine-tunes get a quarter of the pre-training steps).
# Usage (repository root):  bash results/study/run_resolution.sh [DATA_DIR]
# Rerunning resumes (finished cells are kept); B (minutes), OUT, THREADS and EXTRA (more options) can be overridden.
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${OUT:-results/study/resolution-cifar10}
VITLAB=${VITLAB:-.venv/bin/vitlab}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
$VITLAB study resolution --data "$DATA" --out "$OUT" --pretrain-size 32 --sizes 32,48,64 \
    --finetune-ratio 0.25 --budget-minutes "${B:-30}" --set threads="${THREADS:-2}" "${EXTRA_ARGS[@]}"
