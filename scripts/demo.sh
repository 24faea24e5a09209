#!/usr/bin/env bash
# Install vitlab into .venv (torch pinned) and run the main job on the data that ships with the project.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e .
.venv/bin/vitlab demo "$@"
