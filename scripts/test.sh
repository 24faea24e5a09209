#!/usr/bin/env bash
# Install everything into .venv (torch pinned to the builds this machine has on disk) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,tensorboard,onnx]"
.venv/bin/python -m pytest -q "$@"
