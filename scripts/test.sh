#!/usr/bin/env bash
# Install everything into .venv (torch pinned to the builds this machine has on disk) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "test,tensorboard,onnx"
.venv/bin/python -m pytest -q "$@"
