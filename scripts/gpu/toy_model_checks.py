"""Quick checks of trained toy models against issue 16's targets, on the GPU that trained them.

For each model folder and its random-weight control (the same sizes, seed 0): the per-layer mIoU at t = 8 on the
toy datasets' val sets under the views the appendix roles use, and the mean number of unsupervised proposals per
image at several KL thresholds (empty prompt, every layer). Writes one JSON per model and prints a summary.

    python scripts/gpu/toy_model_checks.py --data DATA_ROOT --work WORK --out OUT MODEL_DIR [MODEL_DIR ...]

DATA_ROOT holds the val sets made by `generate_toy_world(DATA_ROOT/<preset>, preset=<preset>, n_train=0, ...)`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from seg4diff_repro.attention.cache import read_cached_image
from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box
from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline
from seg4diff_repro.models.tiny_sizes import TOY_WORLD_SD3_CONFIG
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.metrics import ConfusionMatrix
from seg4diff_repro.segmentation.unsupervised import proposals_from_token_maps

# (preset, view) pairs: the appendix roles' stand-ins (VOC20, VOC21, COCO-Object, ADE20K, COCO-Stuff).
VIEWS = [("objects", "drop"), ("objects", "last"), ("crowd", "ignore"), ("scenes", "class"), ("stuff", "class")]
KL_THRESHOLDS = (0.1, 0.05, 0.01)


def _settings(name: str, source: Path, preset: str, view: str, prompt: str) -> ExtractionSettings:
    return ExtractionSettings.from_dict(dict(
        model=name, backbone="sd3", dataset=f"{preset}_{view}", source=str(source), dtype="float32", timestep=8,
        num_steps=28, layers="all", seed=0, short_side=None, resize="stretch", prompt=prompt,
        background_name="background", split="val", background=view, limit=None,
    ))


def miou_per_layer(cache: Path, data: Path) -> list[float]:
    """score_layers' mIoU per layer (default settings), without pandas, which the GPU image lacks: toy prompts
    never reach the 77-token window's end, so both prompt-overflow rules give these numbers."""
    manifest = json.loads((cache / "manifest.json").read_text())
    extraction = manifest["settings"]
    dataset = SegmentationDataset(data, "val", background=extraction["background"])
    confusion = {layer: ConfusionMatrix(len(dataset.class_names), dataset.ignore_index) for layer in manifest["layers"]}
    for sample in dataset:
        cached = read_cached_image(cache, sample.image_id)
        label = dataset.label_for_scoring(crop_to_box(sample.label, cached.box))
        for position, layer in enumerate(cached.layers.tolist()):
            maps = class_score_maps(cached.i2t[position], cached.local_spans(cached.spans), cached.token_grid, False, False)
            confusion[layer].update(predict_labels(cached.class_ids, maps, len(dataset.class_names), label.shape), label)
    return [confusion[layer].compute()["mIoU"] for layer in manifest["layers"]]


def check_model(name: str, source: Path, data: Path, work: Path, device: str) -> dict:
    result: dict = {"model": name, "mIoU": {}, "proposals_per_image": {}}
    for preset, view in VIEWS:
        cache = work / "attention" / name / f"{preset}_{view}"
        extract_attention(_settings(name, source, preset, view, "oracle"), data / preset, cache, device=device,
                          batch_size=32)
        result["mIoU"][f"{preset}/{view}"] = [round(float(v), 2) for v in miou_per_layer(cache, data / preset)]
    cache = work / "attention" / name / "stuff_null"
    extract_attention(_settings(name, source, "stuff", "class", "null"), data / "stuff", cache, device=device, batch_size=32)
    manifest = json.loads((cache / "manifest.json").read_text())
    counts = {tau: np.zeros(len(manifest["layers"])) for tau in KL_THRESHOLDS}
    for image_id in manifest["image_ids"]:
        cached = read_cached_image(cache, image_id)
        for position in range(len(cached.layers)):
            maps = cached.i2t[position].astype(np.float64)
            for tau in KL_THRESHOLDS:
                counts[tau][position] += len(proposals_from_token_maps(maps, cached.token_grid, tau))
    for tau, total in counts.items():
        result["proposals_per_image"][str(tau)] = [round(float(v), 2) for v in total / len(manifest["image_ids"])]
    return result


def summary(trained: dict, control: dict) -> dict:
    rows = {}
    for key, per_layer in trained["mIoU"].items():
        best = int(np.argmax(per_layer))
        rows[key] = {
            "best layer": best, "best": per_layer[best], "median": float(np.median(per_layer)),
            "control best": max(control["mIoU"][key]),
            "best - median": round(per_layer[best] - float(np.median(per_layer)), 2),
            "best - control best": round(per_layer[best] - max(control["mIoU"][key]), 2),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="trained toy model folders")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    for folder in args.models:
        sizes = json.loads((folder / "seg4diff_model.json").read_text())["config"]
        config = replace(TOY_WORLD_SD3_CONFIG, num_attention_heads=sizes["num_attention_heads"],
                         caption_projection_dim=sizes["caption_projection_dim"])
        control_dir = args.work / "controls" / folder.parent.name
        write_tiny_sd3_pipeline(control_dir, config=config, seed=0)
        tag = folder.parent.name
        trained = check_model(f"{tag}_trained", folder, args.data, args.work, args.device)
        control = check_model(f"{tag}_control", control_dir, args.data, args.work, args.device)
        report = {"trained": trained, "control": control, "summary": summary(trained, control)}
        (args.out / f"checks_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"\n=== {tag}: {sizes['num_layers']} blocks, {sizes['num_attention_heads']} heads ===", flush=True)
        for key, row in report["summary"].items():
            print(f"{key:16s} " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        for key, per_layer in trained["mIoU"].items():
            print(f"{key:16s} trained per layer {per_layer}", flush=True)
            print(f"{key:16s} control per layer {control['mIoU'][key]}", flush=True)
        for tau, per_layer in trained["proposals_per_image"].items():
            print(f"proposals tau {tau}: trained {per_layer} | control {control['proposals_per_image'][tau]}", flush=True)


if __name__ == "__main__":
    main()
