#!/usr/bin/env bash
# Install vitlab into .venv (torch pinned), then train the `demo` preset (a small ViT, 3.5 minutes) on the CIFAR-10
# sample that ships inside the package, reload the saved checkpoint, evaluate it and print the test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/vitlab demo "$@"
