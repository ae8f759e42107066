#!/usr/bin/env bash
# Train a model of the harder toy world (issue 16: datasets/toy_world.py, TOY_WORLD_SD3_CONFIG) on one GPU, with a
# fixed seed. (The committed models/toy_sd3 came from one call of it, in 530 s of training: the command is in
# benchmarks/RESULTS.md, "One-shot trainings"; its seg4diff_model.json holds the recipe and losses.)
#
# Run from the repository root on the GPU machine (no network): `bash scripts/gpu/train_toy_model.sh`. Where diffusers
# is missing it installs the wheels of $WHEELS (default .gpuwheels/: diffusers, open_clip_torch, ftfy, wcwidth, and for
# the checks, which read the package's config module, the Python 3.12 wheels of jsonschema, jsonschema-specifications,
# referencing, rpds-py, attrs and pyyaml) into /tmp/site.
#
# HEADS lists the widths to train (attention heads of 16 channels) and ALIGN_WEIGHTS the weights of the alignment
# loss at ALIGN_LAYER (when set): one training per combination, run side by side on the GPU (the tiny models leave
# it mostly idle). Per run it writes into $OUT/<run>/: toy_sd3.tar.gz (the save_pretrained folder, float16),
# seg4diff_model.json and train.log; then scripts/gpu/toy_model_checks.py scores each against its random control
# (checks_<run>.json, printed). Unpack the chosen one with
# `tar -xzf toy_sd3.tar.gz -C DIR/`, which gives DIR/toy_sd3/.
# Budget: < 1 min of data generation, <= MAX_WALL_S of training, about 2 min of checks.
# The defaults below are the committed model's settings (benchmarks/RESULTS.md, "One-shot trainings", the fourth).
set -euo pipefail

OUT="${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/seg4diff_toy}"
# The committed model's settings. The environment overrides them only for a CPU dry run of this script
# (e.g. DEVICE=cpu TRAIN_IMAGES=64 N_VAL=4 VAE_STEPS=4 TRANSFORMER_STEPS=4 BATCH=4 VAE_BATCH=4).
SEED="${SEED:-0}"
HEADS="${HEADS:-4}"
TRAIN_IMAGES="${TRAIN_IMAGES:-16384}"
N_VAL="${N_VAL:-64}"
VAE_STEPS="${VAE_STEPS:-800}"
VAE_BATCH="${VAE_BATCH:-128}"
TRANSFORMER_STEPS="${TRANSFORMER_STEPS:-40000}"  # more than fit: the time cap ends the training
BATCH="${BATCH:-256}"
LR="${LR:-1e-3}"
MAX_WALL_S="${MAX_WALL_S:-530}"   # cap on training; the steps actually done are recorded and printed
COMPILE="${COMPILE:-1}"           # train through torch.compile (falls back to eager, logged, if it fails)
NAMES_PROB="${NAMES_PROB:-0.6}"     # share of class-name-only prompts ("background circle square")
ALIGN_LAYER="${ALIGN_LAYER-5}"     # joint layer trained against the labels (train_toy.py, point 8); set empty: none
ALIGN_WEIGHTS="${ALIGN_WEIGHTS:-3}"  # one training per weight (and per width), side by side
INIT_FROM="${INIT_FROM:-}"        # a packed earlier model (toy_sd3.tar.gz) to continue from (set VAE_STEPS=0 to keep its VAE)
CHECKS="${CHECKS:-1}"             # 0: skip the checks (run scripts/gpu/toy_model_checks.py elsewhere)
DEVICE="${DEVICE:-cuda}"
MAX_FILE_BYTES=16000000

mkdir -p "$OUT" "$WORK"
if ! "$PY" -c "import diffusers" 2>/dev/null; then  # the GPU image: install the carried wheels
  mkdir -p /tmp/whl && cp "${WHEELS:-.gpuwheels}"/*.whl /tmp/whl/
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src"
fi
export TQDM_MININTERVAL=15 PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

main() {

stamp "preflight"
"$PY" - <<'PYEOF'
import importlib.util, sys
from pathlib import Path
missing = [m for m in ("torch", "diffusers", "transformers", "safetensors", "PIL", "numpy", "tqdm")
           if importlib.util.find_spec(m) is None]
spec = importlib.util.find_spec("open_clip")
locations = list(spec.submodule_search_locations or []) if spec else []
if not any(Path(p, "bpe_simple_vocab_16e6.txt.gz").is_file() for p in locations):
    missing.append("open_clip (its bpe_simple_vocab_16e6.txt.gz builds the CLIP tokenizers)")
if missing:
    sys.exit("missing: " + "; ".join(missing))
import torch, diffusers, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PYEOF

stamp "generating the training set ($TRAIN_IMAGES mixed images) and the val sets of the presets"
"$PY" - "$WORK" "$TRAIN_IMAGES" "$N_VAL" "$SEED" <<'PYEOF'
import os, sys
from seg4diff_repro.datasets.toy_world import TOY_PRESETS, generate_toy_world
work, n, n_val, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
workers = os.cpu_count() or 1
generate_toy_world(f"{work}/data/toy_world_train", preset="mixed", n_train=n, n_val=0, seed=seed, workers=workers)
for preset in TOY_PRESETS:
    generate_toy_world(f"{work}/data/{preset}", preset=preset, n_train=0, n_val=n_val, seed=seed, workers=workers)
PYEOF

init=()
if [ -n "$INIT_FROM" ]; then
  mkdir -p "$WORK/init" && tar -xzf "$INIT_FROM" -C "$WORK/init" && init=(--init-from "$WORK/init/toy_sd3")
fi
# One training per width and alignment weight: run h<heads> (no ALIGN_LAYER) or h<heads>_a<layer>w<weight>.
runs=()
for heads in $HEADS; do
  if [ -z "$ALIGN_LAYER" ]; then runs+=("h$heads:$heads:"); continue; fi
  for weight in $ALIGN_WEIGHTS; do runs+=("h${heads}_a${ALIGN_LAYER}w$weight:$heads:$weight"); done
done
stamp "trainings: ${runs[*]}"
pids=()
for spec in "${runs[@]}"; do
  IFS=: read -r run heads weight <<< "$spec"
  align=()
  [ -n "$weight" ] && align=(--align-layer "$ALIGN_LAYER" --align-weight "$weight")
  mkdir -p "$OUT/$run" "$WORK/$run"
  "$PY" -m seg4diff_repro.cli_toy train-toy-model --dataset-root "$WORK/data/toy_world_train" \
    --out "$WORK/$run/toy_sd3" --vae-steps "$VAE_STEPS" --vae-batch-size "$VAE_BATCH" \
    --transformer-steps "$TRANSFORMER_STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" --device "$DEVICE" \
    --max-wall-s "$MAX_WALL_S" --log-every 500 --sizes toy_world --attention-heads "$heads" --names-prob "$NAMES_PROB" \
    "${init[@]}" "${align[@]}" $([ "$COMPILE" = 1 ] && echo --compile) \
    > "$OUT/$run/train.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a training failed: see $OUT/*/train.log"; done
models=()
for spec in "${runs[@]}"; do
  run="${spec%%:*}"
  tail -3 "$OUT/$run/train.log"
  [ -f "$WORK/$run/toy_sd3/seg4diff_model.json" ] || continue
  models+=("$WORK/$run/toy_sd3")
  cp "$WORK/$run/toy_sd3/seg4diff_model.json" "$OUT/$run/"
  ( cd "$WORK/$run" && tar -czf "$OUT/$run/toy_sd3.tar.gz" toy_sd3 )
  size=$(stat -c %s "$OUT/$run/toy_sd3.tar.gz")
  [ "$size" -le "$MAX_FILE_BYTES" ] || echo "$run: toy_sd3.tar.gz is $size bytes, over the $MAX_FILE_BYTES per-file limit"
done

[ "$CHECKS" = 1 ] || { stamp "done (checks skipped)"; return; }
stamp "checks: per-layer mIoU and unsupervised proposals against the random controls"
"$PY" scripts/gpu/toy_model_checks.py --data "$WORK/data" --work "$WORK/checks" --out "$OUT" --device "$DEVICE" \
  "${models[@]}" 2>&1 | grep -v "Warning\|warn(" || echo "checks failed (see above); the models are packed all the same"
stamp "done"
}

main 2>&1 | tee "$OUT/train_toy_model.log"
exit "${PIPESTATUS[0]}"
