#!/usr/bin/env bash
# Every GPU of one host: the toy world's forward passes on cuda through Snakemake, with --resources gpu=1 and
# then gpu=N (N = the GPUs nvidia-smi lists), plus one cache split over N image shards (--set-scatter). Evidence
# that N jobs ran at once, each on its own GPU and never two on one: each shard's manifest (claimed GPU, start,
# duration), the jobs' logs ("GPU slot: GPU k ..."), and nvidia-smi sampled every 0.5 s.
#
# Run from the repository root on a machine with 2+ GPUs (device tool, kind nvidia-h200-x2), with the wheels of
# benchmarks/multi_gpu_wheels.sh carried in .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src && bash benchmarks/multi_gpu.sh
# It needs torch (there), and snakemake, diffusers, open_clip_torch and their missing dependencies (the wheels).
# Writes into $OUT: summary.md and summary.json (wall times, speed-up, overlap checks), jobs.csv (one row per
# extraction job: run, GPU, start, end), nvidia_smi.csv (per-GPU utilisation and memory), apps.csv (processes
# per GPU, where the driver shows them), snakemake.log. About 5 minutes on two H200s.
#   IMAGES (default 512): toy-shapes val images per forward-pass job; TIMESTEPS (default "1 4 8 14 20 28");
#   DEVICE (default cuda; cpu only to check this script's mechanics on a machine without GPUs).
set -uo pipefail
OUT="${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
IMAGES="${IMAGES:-512}"
TIMESTEPS="${TIMESTEPS:-1 4 8 14 20 28}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-/tmp/seg4diff_multi_gpu}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
REPO=$PWD
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
[ "$GPUS" -ge 2 ] || echo "warning: only $GPUS GPU(s): the gpu=N run shows no gain" >&2
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/snakemake.log"; }

"$PY" -c "import torch, diffusers, snakemake, open_clip; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'snakemake', snakemake.__version__, 'GPUs', torch.cuda.device_count())" \
    2>&1 | tee -a "$OUT/snakemake.log" || { echo "missing packages: see benchmarks/multi_gpu_wheels.sh" >&2; exit 1; }
# The jobs run workflow/bin/seg4diff-repro, i.e. `python -m seg4diff_repro.cli` (this checkout's src/ is on
# PYTHONPATH): a `python` that is the Python with torch, also where only python3 exists.
mkdir -p "$WORK/bin"
# A wrapper, not a link: a link to a virtual environment's python would not run in that environment.
rm -f "$WORK/bin/python"; printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$PY")" > "$WORK/bin/python" && chmod +x "$WORK/bin/python"
export PATH="$WORK/bin:$PATH"
snakemake() { "$PY" -m snakemake "$@"; }  # pip --target installs no console script on PATH

# The workflow in a scratch folder, the toy models on cuda, a larger toy-shapes val split.
rm -rf "$WORK/run" && mkdir -p "$WORK/run"
cp -r Snakefile workflow envs models profiles "$WORK/run/"
"$PY" - "$WORK/run/config.yaml" "$IMAGES" "$TIMESTEPS" "$DEVICE" <<'EOF'
import sys, yaml
path, images, device = sys.argv[1], int(sys.argv[2]), sys.argv[4]
config = yaml.safe_load(open("config.yaml"))
config["toy_shapes"]["n_val"] = images
for name in ("toy_sd3", "toy_sd3_random"):
    config["models"][name]["device"] = device
config["attention"]["batch_size"] = 64
yaml.safe_dump(config, open(path, "w"), sort_keys=False)
EOF
cd "$WORK/run"
targets=()
for model in toy_sd3 toy_sd3_random; do
    for k in $TIMESTEPS; do targets+=("results/attention/$model/toy_shapes/t$k/manifest.json"); done
done

nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/nvidia_smi.csv" &
smi=$!
nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory --format=csv -lms 500 > "$OUT/apps.csv" 2>/dev/null &
apps=$!
trap 'kill $smi $apps 2>/dev/null' EXIT

log "preparing the dataset and the random-weight model (not timed)"
snakemake --cores 16 data/prepared/toy_shapes/manifest.json results/models/toy_sd3_random >> "$OUT/snakemake.log" 2>&1 || exit 1

collect() {  # $1: run name; appends every shard record of this run to jobs.jsonl, then clears the results
    "$PY" - "$1" >> "$WORK/jobs.jsonl" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path("results").glob("attention/*/*/t*/shards/*.json")):
    run = json.loads(path.read_text())["run"]
    print(json.dumps({"run": sys.argv[1], "job": str(path.parent.parent), "shard": path.stem,
                      "gpu": (run.get("gpu_slot") or {}).get("gpu"), "cuda_visible_devices": run["cuda_visible_devices"],
                      "gpu_name": run.get("gpu_name"), "waited_s": (run.get("gpu_slot") or {}).get("waited_s"),
                      "start": run["started_at"], "end": run["started_at"] + run["wall_s"],
                      "images": run["images_computed"]}))
EOF
    rm -rf results/attention logs/extract_attention .snakemake/gpu_slots
}

: > "$WORK/jobs.jsonl"
declare -A wall
run() {  # $1: name, then snakemake arguments
    local name=$1; shift
    log "run $name: snakemake $*"
    local start=$SECONDS
    snakemake --cores 16 "$@" >> "$OUT/snakemake.log" 2>&1 || { log "run $name failed"; exit 1; }
    wall[$name]=$((SECONDS - start))
    log "run $name: ${wall[$name]} s"
    grep -h "GPU slot" logs/extract_attention/*.log | sed "s/^/[$name] /" >> "$OUT/snakemake.log"
    collect "$name"
}
run gpu1 --resources gpu=1 -- "${targets[@]}"
run "gpu$GPUS" --resources gpu="$GPUS" -- "${targets[@]}"
one="results/attention/toy_sd3/toy_shapes/t8/manifest.json"
run one_cache_1_shard --resources gpu="$GPUS" -- "$one"
run "one_cache_${GPUS}_shards" --resources gpu="$GPUS" --set-scatter extraction="$GPUS" -- "$one"
kill $smi $apps 2>/dev/null

"$PY" - "$WORK/jobs.jsonl" "$OUT" "$GPUS" "${wall[gpu1]}" "${wall[gpu$GPUS]}" "${wall[one_cache_1_shard]}" \
    "${wall[one_cache_${GPUS}_shards]}" <<'EOF'
import csv, json, sys
from pathlib import Path
jobs_file, out, gpus = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
walls = dict(zip(["gpu1", f"gpu{gpus}", "one_cache_1_shard", f"one_cache_{gpus}_shards"], map(int, sys.argv[4:8])))
jobs = [json.loads(line) for line in jobs_file.read_text().splitlines()]
with open(out / "jobs.csv", "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(jobs[0]))
    writer.writeheader()
    writer.writerows(jobs)
summary = {"gpus": gpus, "wall_s": walls}
for run in walls:
    mine = [j for j in jobs if j["run"] == run]
    pairs = [(a, b) for i, a in enumerate(mine) for b in mine[i + 1:] if a["start"] < b["end"] and b["start"] < a["end"]]
    # peak number of jobs holding a GPU at once
    events = sorted([(j["start"], 1) for j in mine] + [(j["end"], -1) for j in mine])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    summary[run] = {"jobs": len(mine), "gpus_used": sorted({j["gpu"] for j in mine}, key=str),
                    "peak_concurrent_jobs": peak, "overlapping_pairs": len(pairs),
                    "overlapping_pairs_on_one_gpu": sum(a["gpu"] is not None and a["gpu"] == b["gpu"] for a, b in pairs),
                    "gpu_busy_s": round(sum(j["end"] - j["start"] for j in mine), 1)}
summary["speedup_all_jobs"] = round(walls["gpu1"] / walls[f"gpu{gpus}"], 2)
summary["speedup_one_cache"] = round(walls["one_cache_1_shard"] / walls[f"one_cache_{gpus}_shards"], 2)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# Multi-GPU scale-out: {gpus} GPUs, {len([j for j in jobs if j['run'] == 'gpu1'])} forward-pass jobs",
         "", "| run | wall s | jobs | GPUs used | peak jobs at once | overlapping pairs on one GPU |",
         "|---|---:|---:|---|---:|---:|"]
for run, wall in walls.items():
    s = summary[run]
    lines.append(f"| {run} | {wall} | {s['jobs']} | {', '.join(map(str, s['gpus_used']))} | "
                 f"{s['peak_concurrent_jobs']} | {s['overlapping_pairs_on_one_gpu']} |")
lines += ["", f"Speed-up, all jobs, gpu=1 -> gpu={gpus}: {summary['speedup_all_jobs']}x; one cache in {gpus} shards: "
          f"{summary['speedup_one_cache']}x."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
