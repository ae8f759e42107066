#!/usr/bin/env bash
# Train the toy world's committed model (models/toy_sd3) once, on one GPU, with a fixed seed.
#
# Run from the repository root on the GPU machine (no network; diffusers and open_clip_torch wheels in .whl/):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src && bash scripts/gpu/train_toy_model.sh
#
# It writes into $OUT: toy_sd3.tar.gz (the save_pretrained folder, float16; split per component if one
# file would exceed 16 MB), seg4diff_model.json, train_toy_model.log, toy_generations_grid.png, and
# quick_checks.json. Unpack with `tar -xzf toy_sd3*.tar.gz -C models/`, which gives models/toy_sd3/.
# Budget: about 1 min of data generation, <= MAX_WALL_S (330 s) of training, < 1 min of quick checks.
# The settings below are the committed model's; config.yaml's toy_model keys must repeat them.
set -euo pipefail

OUT="${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/seg4diff_toy}"
# The committed model's settings. The environment overrides them only for a CPU dry run of this script
# (e.g. DEVICE=cpu TRAIN_IMAGES=64 VAE_STEPS=4 TRANSFORMER_STEPS=4 BATCH=4 VAE_BATCH=4 N_CHECK=2).
SEED="${SEED:-0}"
TRAIN_IMAGES="${TRAIN_IMAGES:-8192}"
VAE_STEPS="${VAE_STEPS:-2000}"
VAE_BATCH="${VAE_BATCH:-128}"
TRANSFORMER_STEPS="${TRANSFORMER_STEPS:-5000}"
BATCH="${BATCH:-256}"
LR="${LR:-5e-4}"
MAX_WALL_S="${MAX_WALL_S:-330}"   # safety cap on training; the steps actually done are recorded and printed
DEVICE="${DEVICE:-cuda}"
N_CHECK="${N_CHECK:-32}"          # val images per quick generation check
MAX_FILE_BYTES=16000000
export DEVICE N_CHECK

mkdir -p "$OUT" "$WORK"
export TQDM_MININTERVAL=15 PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

main() {

stamp "preflight"
"$PY" - <<'EOF'
import importlib, importlib.util, sys
missing = [m for m in ("torch", "diffusers", "transformers", "safetensors", "PIL", "numpy", "tqdm")
           if importlib.util.find_spec(m) is None]
from pathlib import Path
spec = importlib.util.find_spec("open_clip")
locations = list(spec.submodule_search_locations or []) if spec else []
if not any(Path(p, "bpe_simple_vocab_16e6.txt.gz").is_file() for p in locations):
    missing.append("open_clip (its bpe_simple_vocab_16e6.txt.gz builds the CLIP tokenizers: carry the open_clip_torch wheel in .whl/)")
if missing:
    sys.exit("missing: " + "; ".join(missing))
import torch, diffusers, transformers
import os
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
if os.environ["DEVICE"].startswith("cuda") and gpu == "none":
    sys.exit("CUDA is not available")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, GPU {gpu}")
EOF

stamp "generating the training set ($TRAIN_IMAGES images) and the default toy-shapes set (for the checks)"
"$PY" - "$WORK" "$TRAIN_IMAGES" "$SEED" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from seg4diff_repro.datasets.toy_shapes import generate_toy_shapes
work, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with ProcessPoolExecutor(2) as pool:  # same sets as `snakemake prepare_toy_shapes_train prepare_toy_shapes`
    jobs = [pool.submit(generate_toy_shapes, f"{work}/data/toy_shapes_train", n_train=n, n_val=0, seed=seed),
            pool.submit(generate_toy_shapes, f"{work}/data/toy_shapes", n_train=512, n_val=64, seed=seed)]
    for job in jobs:
        job.result()
EOF

stamp "training"
"$PY" -m seg4diff_repro.cli_toy train-toy-model --dataset-root "$WORK/data/toy_shapes_train" \
  --out "$WORK/models/toy_sd3" --vae-steps "$VAE_STEPS" --vae-batch-size "$VAE_BATCH" \
  --transformer-steps "$TRANSFORMER_STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" --device "$DEVICE" \
  --max-wall-s "$MAX_WALL_S" --log-every 250
cp "$WORK/models/toy_sd3/seg4diff_model.json" "$OUT/"

stamp "packing"
( cd "$WORK/models" && tar -czf "$OUT/toy_sd3.tar.gz" toy_sd3 )
if [ "$(stat -c %s "$OUT/toy_sd3.tar.gz")" -gt "$MAX_FILE_BYTES" ]; then
  rm "$OUT/toy_sd3.tar.gz"
  ( cd "$WORK/models" \
    && tar -czf "$OUT/toy_sd3.transformer.tar.gz" toy_sd3/transformer \
    && tar -czf "$OUT/toy_sd3.text_encoders.tar.gz" toy_sd3/text_encoder toy_sd3/text_encoder_2 \
    && tar -czf "$OUT/toy_sd3.rest.tar.gz" --exclude=toy_sd3/transformer --exclude=toy_sd3/text_encoder \
         --exclude=toy_sd3/text_encoder_2 toy_sd3 )
fi
ls -l "$OUT"/toy_sd3*.tar.gz

stamp "quick checks (not fatal): colour of generations, per-layer grounding vs the random control"
"$PY" - "$WORK" "$OUT" "$SEED" <<'EOF' || echo "quick checks failed (see above); the model is packed all the same"
import json, os, sys, time, traceback
from pathlib import Path
import numpy as np, torch
from PIL import Image
work, out, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
model, data = work / "models/toy_sd3", work / "data/toy_shapes"
checks = {}
device, n_check = os.environ["DEVICE"], int(os.environ["N_CHECK"])
try:
    from seg4diff_repro.generation.toy_samples import generate_toy_samples
    from seg4diff_repro.models.sd3 import load_sd3_pipeline
    pipe = load_sd3_pipeline(model, torch.float32).to(device)
    for cfg in (1.0, 2.0, 4.0, 7.5):
        t = time.time()
        recs = generate_toy_samples(pipe, data, n=n_check, seed=seed, guidance_scale=cfg)
        for kind in ("caption", "class names"):
            sub = [r for r in recs if r.prompt_kind == kind]
            single = [r for r in sub if len(r.expected_colours) == 1]
            checks[f"colour_ok cfg{cfg:g} {kind}"] = f"{sum(r.colour_ok for r in sub)}/{len(sub)} (one-shape {sum(r.colour_ok for r in single)}/{len(single)})"
        if cfg == 4.0:  # PIL grid (no matplotlib needed): row pairs = caption / class names, 8 per row
            tiles = [np.concatenate([r.real_image] + [q.image for q in recs if q.image_id == r.image_id], 1)
                     for r in recs if r.prompt_kind == "caption"]
            rows = [np.concatenate(tiles[i:i + 8], 1) for i in range(0, len(tiles), 8)]
            Image.fromarray(np.concatenate(rows, 0)).resize((rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2),
                                                              Image.NEAREST).save(out / "toy_generations_grid.png")
        print(f"cfg {cfg}: {time.time() - t:.1f} s", flush=True)
except Exception:
    traceback.print_exc()
def miou_per_layer(cache, data):
    """score_layers' mIoU per layer; without pandas on this machine, the same loop without the DataFrame."""
    try:
        from seg4diff_repro.segmentation.score import ScoringSettings, score_layers
    except ImportError as error:
        print(f"score_layers unavailable ({error}): scoring with its functions directly", flush=True)
    else:
        scores = score_layers(cache / "manifest.json", data, ScoringSettings())
        return [float(v) for v in scores.sort_values("layer")["mIoU"]]
    from seg4diff_repro.attention.cache import read_cached_image
    from seg4diff_repro.datasets import SegmentationDataset
    from seg4diff_repro.models.preprocess import crop_to_box
    from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
    from seg4diff_repro.segmentation.metrics import ConfusionMatrix
    manifest = json.loads((cache / "manifest.json").read_text())
    dataset = SegmentationDataset(data, "val", drop_background=True)
    layers, n_classes = manifest["layers"], len(dataset.class_names)
    confusion = {layer: ConfusionMatrix(n_classes, dataset.ignore_index) for layer in layers}
    for sample in dataset:
        cached = read_cached_image(cache, sample.image_id)
        label = crop_to_box(sample.label, cached.box)
        spans = cached.local_spans() if hasattr(cached, "local_spans") else cached.spans
        for position, layer in enumerate(cached.layers.tolist()):
            maps = class_score_maps(cached.i2t[position], spans, cached.token_grid, False, False)
            confusion[layer].update(predict_labels(cached.class_ids, maps, n_classes, label.shape), label)
    return [confusion[layer].compute()["mIoU"] for layer in layers]


try:
    import dataclasses
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline
    write_tiny_sd3_pipeline(work / "models/toy_sd3_random", seed=0)
    for name in ("toy_sd3", "toy_sd3_random"):
        values = dict(
            model=name, backbone="sd3", dataset="toy_shapes", source=str(work / "models" / name), dtype="float32",
            timestep=8, num_steps=28, layers="all", seed=0, short_side=None, resize="stretch", prompt="oracle",
            background_name="background", split="val", drop_background=True, background="drop", limit=None)
        # drop_background (older versions) or background (newer): the filter keeps the one this version has.
        fields = {f.name for f in dataclasses.fields(ExtractionSettings)}
        settings = ExtractionSettings.from_dict({k: v for k, v in values.items() if k in fields})
        cache = work / "attention" / name
        extract_attention(settings, data, cache, device=device, batch_size=32)
        miou = [round(v, 1) for v in miou_per_layer(cache, data)]
        checks[f"mIoU per layer {name}"] = miou
        checks[f"best/median {name}"] = f"{max(miou):.1f} / {float(np.median(miou)):.1f}"
    best = {n: max(checks[f"mIoU per layer {n}"]) for n in ("toy_sd3", "toy_sd3_random")}
    median = float(np.median(checks["mIoU per layer toy_sd3"]))
    checks["done: best - control best >= 20"] = f"{best['toy_sd3'] - best['toy_sd3_random']:+.1f}"
    checks["done: best - median >= 10"] = f"{best['toy_sd3'] - median:+.1f}"
except Exception:
    traceback.print_exc()
(out / "quick_checks.json").write_text(json.dumps(checks, indent=1) + "\n")
EOF

stamp "summary"
"$PY" - "$OUT" "$WORK/models/toy_sd3" <<'EOF'
import json, sys
from pathlib import Path
out, folder = Path(sys.argv[1]), Path(sys.argv[2])
r = json.loads((out / "seg4diff_model.json").read_text())
checks_file = out / "quick_checks.json"
checks = json.loads(checks_file.read_text()) if checks_file.is_file() else {}
l = r["final_losses"]
rows = [
    ("device", r["device_name"]),
    ("versions", ", ".join(f"{k} {v}" for k, v in r["versions"].items())),
    ("steps done (asked)", f"VAE {r['steps']['vae']} ({r['steps_requested']['vae']}), transformer "
                           f"{r['steps']['transformer']} ({r['steps_requested']['transformer']})"),
    ("batch / lr", f"{r['batch']} / {r['lr']}"),
    ("training wall time", f"{r['wall_time_s']['total_training']} s (VAE {r['wall_time_s']['vae']} s)"),
    ("VAE fixed-batch MSE", f"{l['vae_fixed_batch_mse_before']:.4f} -> {l['vae_fixed_batch_mse_after']:.5f} "
                            f"(PSNR {l['vae_psnr_db']:.1f} dB)"),
    ("flow loss (fixed batch)", f"{l['transformer_fixed_batch_before']:.4f} -> {l['transformer_fixed_batch_after_ema']:.4f} "
                                f"(EMA; raw {l['transformer_fixed_batch_after_raw']:.4f})"),
    ("folder (<= 20 MB)", f"{sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.2f} MB"),
    *[(k, v) for k, v in checks.items()],
    ("files in $OUT", " ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(out.iterdir()))),
]
width = max(len(k) for k, _ in rows)
print("\n=== toy model summary ===")
for k, v in rows:
    print(f"{k:<{width}}  {v}")
EOF
stamp "done"
}

main 2>&1 | tee "$OUT/train_toy_model.log"
exit "${PIPESTATUS[0]}"
