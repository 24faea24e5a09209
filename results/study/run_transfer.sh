#!/usr/bin/env bash
# CIFAR-10 transfer demonstration (docs/study.md, "Transfer"): pre-train on the six animal classes (6,000 images),
# fine-tune on the four vehicle classes with 10, 25, 50, 100, 250 images per class and the whole folder (1,000 per
# class), with the paper's fine-tuning recipe and the small-data recipe, against training from scratch for the same
# steps; few-shot linear probes of the pre-trained features; the chain goes through model.safetensors and the
# official .npz. Plan: about 40 minutes of the 2-core CPU (pre-training 40% of it, ~7,000 steps).
# Usage (repository root):  bash results/study/run_transfer.sh [DATA_DIR]
# Rerunning resumes (finished cells are kept); B (minutes), OUT, THREADS and EXTRA (more options) can be overridden.
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${OUT:-results/study/transfer-cifar10}
VITLAB=${VITLAB:-.venv/bin/vitlab}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
$VITLAB study transfer --data "$DATA" --out "$OUT" \
    --source-classes bird,cat,deer,dog,frog,horse --target-classes airplane,automobile,ship,truck \
    --per-class 10,25,50,100,250,all --shots 1,5,10,25 --draws 5 \
    --budget-minutes "${B:-40}" --set threads="${THREADS:-2}" "${EXTRA_ARGS[@]}"
