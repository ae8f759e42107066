#!/usr/bin/env bash
# Create .venv (once) and install the package with the exact versions CI uses. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# CUDA builds of torch/torchvision: torchvision (needed by open_clip) has no CPU-only wheel that matches
# this torch, and the CUDA build runs on a CPU too.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/ci.txt -e ".[test]"
