#!/usr/bin/env bash
# Everything vitlab checks on a CUDA GPU, in one go, in order of importance: the CUDA tests, the benchmark against
# timm (eager, every model and dtype), a one-minute training run of the small-scratch recipe on the bundled
# sample, and torch.compile rows for ViT-B/16. Runs from src/ (no install) with whatever torch and timm the machine
# has, and writes every output under $OUT (default results/bench/gpu). A stage that fails does not stop the later
# ones; each has its own time limit.
#   usage: OUT=dir [STAGES="tests eager train compile"] [BENCH_ARGS=...] \
#          bash scripts/gpu_check.sh
# STAGES picks stages; BENCH_ARGS replaces the eager benchmark's model/dtype/task choice (a shorter re-run).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/bench/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests eager train compile}
run() { [[ " $STAGES " == *" $1 "* ]]; }

# At most 8 files come back from a lent GPU machine: the machine's description shares one.
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', torch.__version__,
           'timm', timm.__version__)"; } 2>&1 | tee "$OUT/machine.txt"

tests_status=0
if run tests; then
    echo "== CUDA tests"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/model/test_cuda.py tests/train/test_cuda.py 2>&1 \
        | tee "$OUT/pytest_cuda.txt"
    tests_status=$?  # pipefail: pytest's status, not tee's
fi

# Batches that fill the GPU: large enough that a call takes milliseconds, not launch overhead.
INFER="ViT-Ti/16=1024,ViT-S/16=512,ViT-B/16=256,cifar=8192"
TRAIN="ViT-Ti/16=256,ViT-S/16=256,ViT-B/16=128,cifar=2048"
BENCH_ARGS=${BENCH_ARGS:---models ViT-Ti/16,ViT-S/16,ViT-B/16,cifar --dtypes fp32,bf16-autocast,bf16-weights \
    --tasks infer,latency,train}
run eager && echo "== benchmark, eager" && timeout 300 $PY -m vitlab bench --device cuda $BENCH_ARGS --modes eager \
    --infer-batch "$INFER" --train-batch "$TRAIN" --reps 10 --latency-reps 30 --warmup 3 --peak-n 8192 --no-data \
    --out "$OUT/gpu_eager.json" 2>&1 | tee "$OUT/bench_eager.txt"

run train && echo "== small-scratch recipe, one minute on the bundled sample" && rm -rf /tmp/vitlab-gpu-run &&
timeout 150 $PY -m vitlab train --config small-scratch --data src/vitlab/data/cifar10_sample \
    --out /tmp/vitlab-gpu-run --set budget_minutes=1 --set eval_every=0 --json 2>&1 | tail -n 5 | tee "$OUT/train.txt"
run train && cp /tmp/vitlab-gpu-run/final.json "$OUT/train_final.json"

run compile && echo "== benchmark, torch.compile (ViT-B/16, bf16 autocast)" && timeout 300 $PY -m vitlab bench \
    --device cuda --models ViT-B/16 --dtypes bf16-autocast --modes compile --compile-tasks infer,train \
    --tasks infer,train --infer-batch "$INFER" --train-batch "$TRAIN" --reps 10 --warmup 3 --peak-n 8192 \
    --no-data --no-memory --out "$OUT/gpu_compile.json" 2>&1 | tee "$OUT/bench_compile.txt"
# The exit status is the CUDA tests' (0 when that stage did not run); the other stages leave their files in $OUT.
exit "$tests_status"
