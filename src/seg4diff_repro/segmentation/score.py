"""Scoring stage: per-layer open-vocabulary segmentation scores from the attention cache."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from seg4diff_repro.provenance import code_fingerprint, provenance, provenance_label
from seg4diff_repro.attention.cache import read_cached_image, settings_key
from seg4diff_repro.attention.cache import load_manifest
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box, resized_shape
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.metrics import ConfusionMatrix, RunningMean
from seg4diff_repro.segmentation.prompts import PROMPT_OVERFLOW, overflowing_classes, window_spans
from seg4diff_repro.segmentation.shards import accumulate_in_shards

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 64


@dataclass(frozen=True)
class ScoringSettings:
    """Options applied to cached maps; changing them never requires a new forward pass."""

    softmax: bool = True  # post-softmax maps (the paper's default) or the pre-softmax logits (appendix Table 1)
    norm_before_merge: bool = False
    norm_after_merge: bool = False
    # Classes past the 77-token window: the official NaN maps / <eos> averaging, or corrected (prompts.PROMPT_OVERFLOW).
    # Both are scored; this one gives the headline pACC, mACC and mIoU.
    prompt_overflow: str = "official"

    def __post_init__(self) -> None:
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(
                f"segmentation.prompt_overflow={self.prompt_overflow!r}: use one of {list(PROMPT_OVERFLOW)}"
            )

    @property
    def attention(self) -> str:
        return ("post-softmax" if self.softmax else "pre-softmax logits") + ", head mean"


def _layer_name(layer: int) -> str:
    return f"layer_{layer:03d}"


def lora_columns(record: dict | None) -> dict:
    """Score columns naming the MAGNET adapter the maps were computed with (`models.common.adapter_record`, a cache
    manifest's ``lora``): run, protocol, checkpoint policy and iteration, content fingerprint; none without one."""
    if record is None:
        return {}
    checkpoint = record.get("checkpoint") or {}
    return {"lora_run": record["run"], "lora_protocol": record["protocol"], "lora_checkpoint": checkpoint.get("policy"),
            "lora_iteration": checkpoint.get("iteration"), "lora_fingerprint": record["fingerprint"]}


def _scoring_key(cache_manifest: Path, settings: dict) -> str:
    """Key of a scoring run: the cache it reads (its manifest, byte for byte: settings, model, dataset and
    extraction code), the settings and the scoring code."""
    manifest = hashlib.sha256(Path(cache_manifest).read_bytes()).hexdigest()
    return settings_key({"cache_manifest_sha256": manifest, "scoring": settings, "code_fingerprint": code_fingerprint("scoring")})


def score_layers(
    cache_manifest: Path, dataset_root: Path, settings: ScoringSettings, shard_root: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> pd.DataFrame:
    """pACC, mACC and mIoU (percent) of every cached layer, one row per layer.

    Confusion matrices are kept per shard of ``shard_size`` images under ``shard_root``, so an
    interrupted run resumes with the shards it had finished.
    """
    manifest = load_manifest(cache_manifest)
    extraction = manifest["settings"]
    dataset = SegmentationDataset(
        dataset_root, extraction["split"], background=extraction["background"], limit=extraction["limit"]
    )
    if dataset.ids != manifest["image_ids"]:
        raise ValueError(
            f"{cache_manifest} lists other images than {dataset_root} split {extraction['split']!r}: "
            "the dataset changed after extraction; re-run the extraction rule"
        )
    num_classes = len(dataset.class_names)
    layers = manifest["layers"]
    cache_dir = Path(cache_manifest).parent
    text_tokens = manifest["text_tokens"]
    other_rule = next(rule for rule in PROMPT_OVERFLOW if rule != settings.prompt_overflow)

    def add_images(accumulators: dict, positions: range) -> None:
        for position in positions:
            sample = dataset[position]
            cached = read_cached_image(cache_dir, sample.image_id)
            label = dataset.label_for_scoring(crop_to_box(sample.label, cached.box))
            maps = cached.i2t if settings.softmax else cached.logits
            if maps is None:
                raise ValueError(
                    f"{cache_dir} holds no pre-softmax logits (written by an older version): re-run its extraction rule"
                )
            overflowing = overflowing_classes(cached.spans, text_tokens)
            accumulators["overflow_images"].update(overflowing > 0)
            accumulators["overflow_classes"].update(overflowing)
            # The other rule's prediction differs only where some class reaches the window's last position.
            rules = (settings.prompt_overflow, other_rule) if overflowing else (settings.prompt_overflow,)
            for index, layer in enumerate(cached.layers.tolist()):
                for rule in rules:
                    spans = cached.local_spans(window_spans(cached.spans, text_tokens, rule))
                    scores = class_score_maps(
                        maps[index], spans, cached.token_grid,
                        settings.norm_before_merge, settings.norm_after_merge, rule,
                    )
                    prediction = predict_labels(cached.class_ids, scores, num_classes, label.shape)
                    accumulators[f"{rule}_{_layer_name(layer)}"].update(prediction, label)
                if not overflowing:
                    accumulators[f"{other_rule}_{_layer_name(layer)}"].update(prediction, label)

    merged = accumulate_in_shards(
        dataset.ids, shard_root,
        _scoring_key(cache_manifest, asdict(settings)), shard_size,
        lambda: {
            **{f"{rule}_{_layer_name(layer)}": ConfusionMatrix(num_classes, dataset.ignore_index)
               for rule in PROMPT_OVERFLOW for layer in layers},
            "overflow_images": RunningMean(), "overflow_classes": RunningMean(),
        },
        add_images, "score layers",
    )

    noising = manifest["noising"]
    rows = [
        {
            "model": extraction["model"],
            "dataset": extraction["dataset"],
            "layer": layer,
            **merged[f"{settings.prompt_overflow}_{_layer_name(layer)}"].compute(),
            **{f"mIoU_overflow_{rule}": merged[f"{rule}_{_layer_name(layer)}"].compute()["mIoU"]
               for rule in PROMPT_OVERFLOW},
            "overflow_images": int(merged["overflow_images"].total),
            "overflow_classes": int(merged["overflow_classes"].total),
            "images": len(dataset),
            "timestep_k": noising["k"],
            "num_steps": noising["num_steps"],
            "sigma": noising["sigma"],
            "prompt": extraction["prompt"],
            "prompt_classes_from": extraction["prompt_classes_from"],
            "background": extraction["background"],
            "resize": extraction["resize"],
            "attention": settings.attention,
            **asdict(settings),
            "seed": extraction["seed"],
            **lora_columns(manifest.get("lora")),
            "code_version": provenance_label(provenance("scoring")),
        }
        for layer in layers
    ]
    return pd.DataFrame(rows)


UNSUPERVISED_GEOMETRIES = {
    # The official route: input zero-padded to a multiple of 32, scored at the 640-short-side resized
    # label, with the top-left-crop quirk for images larger than that (docs/method.md#unsupervised-protocol).
    "official": 32,
    # Ours: no padding, scored at the original label resolution like the open-vocabulary protocol.
    "aligned": None,
}


def score_unsupervised(
    cache_manifest: Path, dataset_root: Path, shard_root: Path, kl_threshold: float = 0.1,
    geometry: str = "official", shard_size: int = DEFAULT_SHARD_SIZE, matching: str = "per_row",
    scored_classes: int | None = None,
) -> pd.DataFrame:
    """Unsupervised segmentation (docs/method.md#unsupervised-protocol) of each cached layer: empty-prompt token maps → KL-merged
    proposals → clusters, scored with Hungarian matching; one row per layer.

    Both matchings are scored (``mIoU_per_row``: the official trainer's, ``mIoU_per_image``: the corrected);
    ``matching`` picks the headline ``mIoU`` and ``pACC``. ``scored_classes`` is the official N_CLASS (the
    entries of the test json) where it differs from the view's class count: labels from it on are dropped.
    ``geometry`` "official" needs a cache extracted with ``pad_multiple`` 32, "aligned" one without padding.
    """
    from seg4diff_repro.segmentation.unsupervised import (
        MATCHING,
        HungarianAccumulator,
        cluster_labels,
        official_cluster_labels,
        proposals_from_token_maps,
    )

    if geometry not in UNSUPERVISED_GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}: use one of {sorted(UNSUPERVISED_GEOMETRIES)}")
    if matching not in MATCHING:
        raise ValueError(f"matching={matching!r}: use one of {list(MATCHING)}")
    manifest = load_manifest(cache_manifest)
    extraction = manifest["settings"]
    if extraction["prompt"] != "null":
        raise ValueError(f"{cache_manifest} was extracted with the {extraction['prompt']!r} prompt; "
                         "unsupervised segmentation needs the empty prompt (protocol 'null')")
    if extraction.get("pad_multiple") != UNSUPERVISED_GEOMETRIES[geometry]:
        raise ValueError(
            f"{cache_manifest} was extracted with pad_multiple={extraction.get('pad_multiple')!r}, but geometry "
            f"{geometry!r} needs {UNSUPERVISED_GEOMETRIES[geometry]!r}: re-run its extraction rule"
        )
    dataset = SegmentationDataset(
        dataset_root, extraction["split"], background=extraction["background"], limit=extraction["limit"]
    )
    num_classes = len(dataset.class_names) if scored_classes is None else scored_classes
    if not 1 <= num_classes <= len(dataset.class_names):
        raise ValueError(
            f"scored_classes={scored_classes} for {extraction['dataset']}: use 1..{len(dataset.class_names)} "
            "(the view's class count) or null"
        )
    layers = manifest["layers"]
    cache_dir = Path(cache_manifest).parent

    def add_images(accumulators: dict, positions: range) -> None:
        for position in positions:
            sample = dataset[position]
            cached = read_cached_image(cache_dir, sample.image_id)
            label = dataset.label_for_scoring(crop_to_box(sample.label, cached.box))
            if geometry == "official":
                resized = resized_shape(*label.shape, extraction["short_side"])
                # detectron2's mapper resizes the (uint8) label with PIL's nearest neighbour.
                resized_label = Image.fromarray(label.astype(np.uint8)).resize(resized[::-1], Image.NEAREST)
                label = np.asarray(resized_label).astype(label.dtype)
            for index, layer in enumerate(cached.layers.tolist()):
                proposals = proposals_from_token_maps(cached.i2t[index].astype(np.float64), cached.token_grid, kl_threshold)
                if geometry == "official":
                    clusters = official_cluster_labels(proposals, sample.label.shape, label.shape)
                else:
                    clusters = cluster_labels(proposals, label.shape)
                for rule in MATCHING:
                    accumulators[f"{rule}_{_layer_name(layer)}"].update(clusters, label)
                accumulators[f"proposals_{_layer_name(layer)}"].update(len(proposals))

    merged = accumulate_in_shards(
        dataset.ids, shard_root,
        _scoring_key(
            cache_manifest, {"kl_threshold": kl_threshold, "geometry": geometry, "scored_classes": num_classes}
        ),
        shard_size,
        lambda: {
            **{f"{rule}_{_layer_name(layer)}": HungarianAccumulator(num_classes, dataset.ignore_index, rule)
               for rule in MATCHING for layer in layers},
            **{f"proposals_{_layer_name(layer)}": RunningMean() for layer in layers},
        },
        add_images, "score unsupervised",
    )
    noising = manifest["noising"]
    rows = []
    for layer in layers:
        results = {rule: merged[f"{rule}_{_layer_name(layer)}"].compute() for rule in MATCHING}
        rows.append({
            "model": extraction["model"], "dataset": extraction["dataset"], "layer": layer,
            "mIoU": results[matching]["mIoU"], "pACC": results[matching]["pACC"],
            **{f"{metric}_{rule}": results[rule][metric] for rule in MATCHING for metric in ("mIoU", "pACC")},
            "matching": matching,
            "mean_proposals": merged[f"proposals_{_layer_name(layer)}"].compute(),
            "images": len(dataset), "timestep_k": noising["k"], "num_steps": noising["num_steps"],
            "sigma": noising["sigma"], "prompt": "empty (null)", "resize": extraction["resize"],
            "geometry": geometry, "attention": "post-softmax, head mean", "kl_threshold": kl_threshold,
            "background": extraction["background"], "scored_classes": num_classes,
            "out_of_range_pixels": results[matching]["n_out_of_range"],
            "seed": extraction["seed"], **lora_columns(manifest.get("lora")),
            "code_version": provenance_label(provenance("scoring")),
        })
    return pd.DataFrame(rows)
