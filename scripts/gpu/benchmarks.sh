#!/usr/bin/env bash
# The GPU benchmarks in one call on the lent H100 (device tool), with .whl/ carried:
#   diffusers, psutil and open_clip_torch wheels (open_clip only for its BPE vocabulary file).
# Results land in $OUT; the tables are copied into benchmarks/RESULTS.md by hand.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
models=${CAPTURE_MODELS:-sd3 sd35 flux}
python3 benchmarks/capture.py --models $models --rounds "${CAPTURE_ROUNDS:-15}" --out "$OUT/capture.json" 2>&1 | tee "$OUT/capture.log"
if [ "${RUN_EXTRACTION:-1}" = 1 ]; then
    python3 benchmarks/extraction.py --images "${EXTRACTION_IMAGES:-48}" --out "$OUT/extraction.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/extraction.log"
fi
if python3 -c "import pytest" 2>/dev/null; then
    python3 -m pytest -q -rs tests/test_attention_recorder.py -k gpu -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
fi
