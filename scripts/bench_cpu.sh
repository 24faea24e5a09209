#!/usr/bin/env bash
# The CPU rows of README's and docs/speed.md's speed tables, vitlab against timm in one process, for this machine's
# CPU class, or for the AVX2 class simulated on an AVX-512 machine (ATen, oneDNN and MKL held to AVX2):
#   bash scripts/bench_cpu.sh            # -> results/bench/cpu-{fp32,bf16}-*-<class>.json (class from /proc/cpuinfo)
#   bash scripts/bench_cpu.sh --avx2     # -> results/bench/cpu-fp32-*-avx2sim.json
# Run it with the machine otherwise idle: the two libraries share it in turns, but other load still adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--avx2" ]; then
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    class=avx2sim
elif grep -q amx_tile /proc/cpuinfo; then
    class=avx512bf16-amx
elif grep -q avx512_bf16 /proc/cpuinfo; then
    class=avx512bf16
else
    class=avx2
fi
vitlab=.venv/bin/vitlab
out=results/bench
common=(--modes eager --no-data --threads 2)

# fp32 (what precision auto runs on AVX2 CPUs): inference at batch 8 and batch-1 latency of ViT-S/16 and ViT-B/16 and
# the CIFAR model, and the CIFAR model's training step (batch 128) with its peak memory.
$vitlab bench --models ViT-S/16,ViT-B/16,cifar --dtypes fp32 --tasks infer,latency,train --train-models cifar \
    --reps 7 --latency-reps 9 --infer-batch ViT-S/16=8,ViT-B/16=8 "${common[@]}" \
    --out "$out/cpu-fp32-infer-latency-train-$class.json"

# bf16 (what precision auto runs on AVX512-BF16 CPUs): inference and latency under autocast and with bf16 weights,
# training under autocast with peak memory.
if [ "$class" = avx512bf16 ] || [ "$class" = avx512bf16-amx ]; then
    $vitlab bench --models ViT-S/16,ViT-B/16 --dtypes bf16-autocast,bf16-weights --tasks infer,latency --reps 5 \
        --latency-reps 9 --infer-batch ViT-B/16=4 "${common[@]}" --out "$out/cpu-bf16-infer-latency-$class.json"
    $vitlab bench --models cifar,ViT-S/16 --dtypes bf16-autocast --tasks train --reps 5 --train-batch ViT-S/16=16 \
        "${common[@]}" --out "$out/cpu-bf16-train-$class.json"
fi

# What an explicit bf16 costs where it is emulated (the warning vitlab.precision gives quotes it): the CIFAR model's
# training step in fp32 and under bf16 autocast (a small matmul for the peaks: emulated bf16 is slow).
if [ "$class" = avx2 ] || [ "$class" = avx2sim ]; then
    $vitlab bench --models cifar --dtypes fp32,bf16-autocast --tasks train --reps 3 --peak-n 512 --no-memory \
        "${common[@]}" --out "$out/cpu-emulated-bf16-train-$class.json"
fi
