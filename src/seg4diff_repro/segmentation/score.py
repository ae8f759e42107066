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
from seg4diff_repro.attention.extract import load_manifest
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box, resized_shape
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.metrics import ConfusionMatrix, RunningMean
from seg4diff_repro.segmentation.shards import accumulate_in_shards

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 64


@dataclass(frozen=True)
class ScoringSettings:
    """Options applied to cached maps; changing them never requires a new forward pass."""

    softmax: bool = True  # post-softmax maps (the paper's default) or the pre-softmax logits (appendix Table 1)
    norm_before_merge: bool = False
    norm_after_merge: bool = False

    @property
    def attention(self) -> str:
        return ("post-softmax" if self.softmax else "pre-softmax logits") + ", head mean"


def _layer_name(layer: int) -> str:
    return f"layer_{layer:03d}"


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
        dataset_root, extraction["split"], drop_background=extraction["drop_background"], limit=extraction["limit"]
    )
    if dataset.ids != manifest["image_ids"]:
        raise ValueError(
            f"{cache_manifest} lists other images than {dataset_root} split {extraction['split']!r}: "
            "the dataset changed after extraction; re-run the extraction rule"
        )
    num_classes = len(dataset.class_names)
    layers = manifest["layers"]
    cache_dir = Path(cache_manifest).parent

    def add_images(confusion: dict[str, ConfusionMatrix], positions: range) -> None:
        for position in positions:
            sample = dataset[position]
            cached = read_cached_image(cache_dir, sample.image_id)
            label = crop_to_box(sample.label, cached.box)
            spans = cached.local_spans()
            maps = cached.i2t if settings.softmax else cached.logits
            if maps is None:
                raise ValueError(
                    f"{cache_dir} holds no pre-softmax logits (written by an older version): re-run its extraction rule"
                )
            for index, layer in enumerate(cached.layers.tolist()):
                scores = class_score_maps(
                    maps[index], spans, cached.token_grid,
                    settings.norm_before_merge, settings.norm_after_merge,
                )
                confusion[_layer_name(layer)].update(
                    predict_labels(cached.class_ids, scores, num_classes, label.shape), label
                )

    merged = accumulate_in_shards(
        dataset.ids, shard_root,
        _scoring_key(cache_manifest, asdict(settings)), shard_size,
        lambda: {_layer_name(layer): ConfusionMatrix(num_classes, dataset.ignore_index) for layer in layers},
        add_images, "score layers",
    )
    confusion = {layer: merged[_layer_name(layer)] for layer in layers}

    noising = manifest["noising"]
    rows = [
        {
            "model": extraction["model"],
            "dataset": extraction["dataset"],
            "layer": layer,
            **confusion[layer].compute(),
            "images": len(dataset),
            "timestep_k": noising["k"],
            "num_steps": noising["num_steps"],
            "sigma": noising["sigma"],
            "prompt": extraction["prompt"],
            "resize": extraction["resize"],
            "attention": settings.attention,
            **asdict(settings),
            "seed": extraction["seed"],
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
    geometry: str = "official", shard_size: int = DEFAULT_SHARD_SIZE,
) -> pd.DataFrame:
    """Unsupervised segmentation (docs/method.md#unsupervised-protocol) of each cached layer: empty-prompt token
    maps → KL-merged proposals → clusters, scored with per-image Hungarian matching; one row per layer.

    ``geometry`` "official" needs a cache extracted with ``pad_multiple`` 32, "aligned" one without padding.
    """
    from seg4diff_repro.segmentation.unsupervised import (
        HungarianAccumulator,
        cluster_labels,
        official_cluster_labels,
        proposals_from_token_maps,
    )

    if geometry not in UNSUPERVISED_GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}: use one of {sorted(UNSUPERVISED_GEOMETRIES)}")
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
        dataset_root, extraction["split"], drop_background=extraction["drop_background"], limit=extraction["limit"]
    )
    layers = manifest["layers"]
    cache_dir = Path(cache_manifest).parent

    def add_images(accumulators: dict, positions: range) -> None:
        for position in positions:
            sample = dataset[position]
            cached = read_cached_image(cache_dir, sample.image_id)
            label = crop_to_box(sample.label, cached.box)
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
                accumulators[_layer_name(layer)].update(clusters, label)
                accumulators[f"proposals_{_layer_name(layer)}"].update(len(proposals))

    merged = accumulate_in_shards(
        dataset.ids, shard_root,
        _scoring_key(cache_manifest, {"kl_threshold": kl_threshold, "geometry": geometry}), shard_size,
        lambda: {
            **{_layer_name(layer): HungarianAccumulator(len(dataset.class_names), dataset.ignore_index) for layer in layers},
            **{f"proposals_{_layer_name(layer)}": RunningMean() for layer in layers},
        },
        add_images, "score unsupervised",
    )
    noising = manifest["noising"]
    rows = []
    for layer in layers:
        result = merged[_layer_name(layer)].compute()
        rows.append({
            "model": extraction["model"], "dataset": extraction["dataset"], "layer": layer,
            "mIoU": result["mIoU"], "pACC": result["pACC"],
            "mean_proposals": merged[f"proposals_{_layer_name(layer)}"].compute(),
            "images": len(dataset), "timestep_k": noising["k"], "num_steps": noising["num_steps"],
            "sigma": noising["sigma"], "prompt": "empty (null)", "resize": extraction["resize"],
            "geometry": geometry, "attention": "post-softmax, head mean", "kl_threshold": kl_threshold,
            "seed": extraction["seed"], "code_version": provenance_label(provenance("scoring")),
        })
    return pd.DataFrame(rows)
