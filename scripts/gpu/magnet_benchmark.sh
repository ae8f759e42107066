#!/usr/bin/env bash
# MAGNET training at SD3-medium size on the lent GPU (device tool, one call, .gpujob carried): diffusers wheel in .whl/.
# Results land in $OUT (magnet_training.json, magnet_training.log); benchmarks/RESULTS.md quotes them.
set -uo pipefail
mkdir -p /tmp/whl && cp .gpujob/.whl/*.whl /tmp/whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/magnet_training.py --batch-sizes ${BATCHES:-1 2 4 8 16} --steps "${STEPS:-3}" --warmup 2 \
    --out "$OUT/magnet_training.json" 2>&1 | grep -v Warning | tee "$OUT/magnet_training.log"
