#!/usr/bin/env bash
# The rehearsal of the paper run and the measurements of its bill, in one call on a lent GPU (device tool).
# Run from the repository root with the wheels the GPU image lacks in .whl/ (diffusers, snakemake and its
# pure-Python dependencies, open_clip_torch, ftfy, wcwidth, pycocotools, jsonschema; benchmarks/RESULTS.md lists them):
#   STEPS="setup rehearse measure" bash benchmarks/rehearsal.sh
# (measure without setup draws the released-size weights on the GPU instead of loading folders)
# 1. writes random-weight SD3-medium, SD3.5-medium and FLUX.1-dev pipelines at their released configurations and
#    small raw copies of the six datasets (benchmarks/rehearsal_setup.py);
# 2. measure: the per-job rates of the bill (benchmarks/appendix_cost.py measure, at most MEASURE_BUDGET s);
# 3. rehearse: every appendix target of configs/paper.yaml through Snakemake under configs/rehearsal.yaml
#    (until DEADLINE); then the bill (appendix_cost.py bill) from the rates and the rehearsal's TSVs.
# Results land in $OUT (at most 8 files): env.txt, setup.log, snakemake.log, rehearsal.tgz (Snakemake's
# benchmark TSVs and logs), gpu_memory.csv (nvidia-smi every 0.5 s), rates.json, measure.log, bill.md.
set -uo pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-585}  # seconds after START by which everything, packing included, is done
left() { echo $((DEADLINE - ($(date +%s) - START))); }
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p .bin
printf '#!/bin/sh\nexec python3 -m seg4diff_repro.cli "$@"\n' > .bin/seg4diff-repro
chmod +x .bin/seg4diff-repro
export PATH=$PWD/.bin:$PATH

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, diffusers, transformers, snakemake; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'snakemake', snakemake.__version__)"
    nproc; df -h . /dev/shm | tail -2
} > "$OUT/env.txt" 2>&1
# Loader worker processes share batches through /dev/shm: fall back to loading in the main process if it fails.
if ! python3 -c "
import torch
from torch.utils.data import DataLoader
class D(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return torch.zeros(3, 1024, 1024)
for _ in DataLoader(D(), batch_size=4, num_workers=2, pin_memory=True): pass
" >> "$OUT/env.txt" 2>&1; then
    export SEG4DIFF_LOADER_WORKERS=0
    echo "loader workers failed: SEG4DIFF_LOADER_WORKERS=0" >> "$OUT/env.txt"
fi

nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_memory.csv" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT

setup() {
    # The pipelines take 46 GB (FLUX.1-dev alone 34 GB): put them where there is room, reached through rehearsal/.
    mkdir -p rehearsal
    for place in "$PWD" /tmp /dev/shm; do
        echo "$(df --output=avail -B1G "$place" | tail -1 | tr -d ' ') $place"
    done | sort -rn > "$OUT/setup.log"
    room=$(head -1 "$OUT/setup.log" | cut -d' ' -f2)
    if [ "$room" != "$PWD" ]; then mkdir -p "$room/rehearsal_models" && ln -sfn "$room/rehearsal_models" rehearsal/models; fi
    echo "models in $room" >> "$OUT/setup.log"
    python3 benchmarks/rehearsal_setup.py --root rehearsal 2>&1 | grep -v "Writing model shards" >> "$OUT/setup.log"
    cat rehearsal/setup.json >> "$OUT/setup.log"
    echo "setup done at $(( $(date +%s) - START )) s" >> "$OUT/setup.log"
}

measure() {
    local budget=$(( $(left) - 35 ))
    [ "$budget" -gt "${MEASURE_BUDGET:-270}" ] && budget=${MEASURE_BUDGET:-270}
    [ "$budget" -lt 90 ] && { echo "measure skipped: ${budget} s left" > "$OUT/measure.log"; return; }
    timeout -k 10 "$budget" python3 benchmarks/appendix_cost.py measure --models rehearsal/models \
        --images "${MEASURE_IMAGES:-16}" --sweep-images "${SWEEP_IMAGES:-4}" --out "$OUT/rates.json" > "$OUT/measure.log" 2>&1
    echo "measure exit $? at $(( $(date +%s) - START )) s" >> "$OUT/measure.log"
}

rehearse() {
    local budget=$(( $(left) - ${MEASURE_RESERVE:-0} - 40 ))
    # The rehearsal's jobs spend most of their time importing and loading, little computing: several share the
    # GPU (GPU slots, SEG4DIFF_JOBS_PER_GPU), and each job's CPU threads are few so that 16 jobs fit 16 cores.
    local per_gpu=${JOBS_PER_GPU:-3} gpus
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    echo "snakemake budget ${budget} s, ${gpus} GPU(s) x ${per_gpu} jobs" > "$OUT/snakemake.log"
    local args=(all --cores "$(nproc)" --resources gpu=$((gpus * per_gpu)) --scheduler greedy
                --configfile config.yaml configs/paper.yaml configs/rehearsal.yaml)
    python3 -m snakemake "${args[@]}" --unlock >> "$OUT/snakemake.log" 2>&1  # a previous call's deadline kill
    SEG4DIFF_JOBS_PER_GPU=$per_gpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 20 "$budget" \
        python3 -m snakemake "${args[@]}" >> "$OUT/snakemake.log" 2>&1
    echo "snakemake exit $? at $(( $(date +%s) - START )) s" >> "$OUT/snakemake.log"
    tar czf "$OUT/rehearsal.tgz" results/benchmarks logs paper_tables figures 2>/dev/null
}

for step in ${STEPS:-setup rehearse measure}; do
    "$step"
done

if [ -f "$OUT/rates.json" ]; then
    timeout 30 python3 benchmarks/appendix_cost.py bill --rates "$OUT/rates.json" --rehearsal-benchmarks results/benchmarks \
        > "$OUT/bill.md" 2>&1
fi
