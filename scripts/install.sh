#!/usr/bin/env bash
# Install vitlab into .venv with torch pinned to the builds this machine has on disk: `bash scripts/install.sh
# [EXTRAS]` (e.g. "test,tensorboard,onnx"). Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # torch 2.14.1 for x86-64 is a CUDA build: with its NVIDIA libraries it takes about 5.6 GB in the venv.
    # Say so up front instead of failing half-installed with pip's "No space left on device".
    free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
    if [ "$free_kb" -lt $((6500 * 1024)) ]; then
        echo "scripts/install.sh: installing torch 2.14.1 into $(pwd)/.venv needs about 6.5 GB free;" \
             "$((free_kb / 1024)) MB are free here. Free some space and run it again." >&2
        exit 1
    fi
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
