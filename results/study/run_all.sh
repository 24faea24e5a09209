#!/usr/bin/env bash
# The three studies published in docs/study.md, as run on the 2-core development CPU (about 25 minutes in all),
# then few-shot evaluation of the two models trained on all of train/ in the data-size study.
# Usage (from the repository root):  bash results/study/run_all.sh [DATA_DIR]
# Rerunning resumes: finished cells are kept, an interrupted cell continues from its checkpoint.
# OUT, the budgets (B_DATA, B_PATCH, B_POS, minutes) and EXTRA (more vitlab study options) can be overridden.
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${OUT:-results/study}
VITLAB=${VITLAB:-.venv/bin/vitlab}
VIT="ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
RESNET="ResNet-26:width_factor=0.5:num_groups=16"
read -r -a COMMON <<< "--set threads=2 ${EXTRA:-}"
# The published data-size run gave every cell the same steps (--steps-rule same); the paper's rule is
# results/study/run_data_size.sh.
$VITLAB study data-size --data "$DATA" --out "$OUT/data-size" --fractions 0.05,0.1,0.3,1.0 --steps-rule same \
    --models "$VIT,$RESNET" --budget-minutes "${B_DATA:-9}" "${COMMON[@]}"
$VITLAB study patch-size --data "$DATA" --out "$OUT/patch-size" --model "$VIT" --patch-sizes 8,4,2 \
    --budget-minutes "${B_PATCH:-6.5}" "${COMMON[@]}"
$VITLAB study pos-embed --data "$DATA" --out "$OUT/pos-embed" --model "$VIT" \
    --kinds none,learned-1d,learned-2d,sincos-2d --budget-minutes "${B_POS:-6.5}" "${COMMON[@]}"
CELLS="$OUT/data-size/cells"
$VITLAB fewshot "$CELLS/ViT-Ti-16_patch_size4_width128_num_heads2_depth4_mlp_dim256_classifiergap__frac_1/model.safetensors" \
    --data "$DATA" --shots 1,5,10,25 --draws 5 --l2 1,16,256 --threads 2 --out "$OUT/fewshot_vit.json"
$VITLAB fewshot "$CELLS/ResNet-26_width_factor0.5_num_groups16__frac_1/model.safetensors" \
    --data "$DATA" --shots 1,5,10,25 --draws 5 --l2 1,16,256 --threads 2 --out "$OUT/fewshot_resnet.json"
