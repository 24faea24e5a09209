#!/usr/bin/env bash
# CIFAR-10 data-size study as the paper ran it (docs/study.md, "Data size"; paper Sec. 4.2, Fig. 3/4): 10% of every
# class of train/ held out for validation (never the test split), ViT and ResNet on nested subsets of the remaining
# 9,000 images, each trained for the same number of epochs (steps in proportion to its data; with this budget
# about 100 epochs, up to ~14,000 steps for the full split), evaluated on validation 10 times, test evaluated once
# with the best validation weights. Plan: about two hours of the 2-core CPU.
# It may run in pieces: stop it (Ctrl-C or kill) and rerun the same command; finished cells are kept and an
# interrupted cell continues from its last checkpoint (written at every evaluation).
# Usage (repository root):  bash results/study/run_data_size.sh [DATA_DIR]
# B (minutes), OUT, THREADS and EXTRA (more options) can be overridden.
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${OUT:-results/study/data-size-paper-rule-cifar10}
VITLAB=${VITLAB:-.venv/bin/vitlab}
VIT="ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
RESNET="ResNet-26:width_factor=0.5:num_groups=16"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
$VITLAB study data-size --data "$DATA" --out "$OUT" --steps-rule proportional --val-fraction 0.1 --evaluations 10 \
    --fractions 0.05,0.1,0.2,0.5,1.0 --models "$VIT,$RESNET" \
    --budget-minutes "${B:-120}" --set threads="${THREADS:-2}" "${EXTRA_ARGS[@]}"
