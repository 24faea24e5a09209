#!/usr/bin/env bash
# Install vitlab into .venv (torch pinned), then train the `demo` preset (a small ViT, 3.5 minutes) on the CIFAR-10
# sample that ships inside the package, reload the saved checkpoint, evaluate it and print the test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e .
.venv/bin/vitlab demo "$@"
