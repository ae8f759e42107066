"""Scoring stage: per-layer open-vocabulary segmentation scores from the attention cache."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from seg4diff_repro import __version__
from seg4diff_repro.attention.cache import read_cached_image
from seg4diff_repro.attention.extract import load_manifest
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.metrics import ConfusionMatrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringSettings:
    """Options applied to cached maps; changing them never requires a new forward pass."""

    softmax: bool = True  # post-softmax maps (the paper's default) or the pre-softmax logits (appendix Table 1)
    norm_before_merge: bool = False
    norm_after_merge: bool = False

    @property
    def attention(self) -> str:
        return ("post-softmax" if self.softmax else "pre-softmax logits") + ", head mean"


def score_layers(cache_manifest: Path, dataset_root: Path, settings: ScoringSettings) -> pd.DataFrame:
    """pACC, mACC and mIoU (percent) of every cached layer, one row per layer."""
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
    confusion = {layer: ConfusionMatrix(num_classes, dataset.ignore_index) for layer in layers}
    cache_dir = Path(cache_manifest).parent
    for sample in tqdm(dataset, total=len(dataset), desc="score layers", unit="image"):
        cached = read_cached_image(cache_dir, sample.image_id)
        label = crop_to_box(sample.label, cached.box)
        spans = cached.local_spans()
        maps = cached.i2t if settings.softmax else cached.logits
        if maps is None:
            raise ValueError(
                f"{cache_dir} holds no pre-softmax logits (written by an older version): re-run its extraction rule"
            )
        for position, layer in enumerate(cached.layers.tolist()):
            scores = class_score_maps(
                maps[position], spans, cached.token_grid,
                settings.norm_before_merge, settings.norm_after_merge,
            )
            confusion[layer].update(predict_labels(cached.class_ids, scores, num_classes, label.shape), label)

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
            "code_version": __version__,
        }
        for layer in layers
    ]
    return pd.DataFrame(rows)


def score_unsupervised(cache_manifest: Path, dataset_root: Path, kl_threshold: float = 0.1) -> pd.DataFrame:
    """Unsupervised segmentation (method_spec §D) of each cached layer: empty-prompt token maps → KL-merged
    proposals → clusters, scored with per-image Hungarian matching; one row per layer."""
    from seg4diff_repro.segmentation.unsupervised import (
        HungarianAccumulator,
        cluster_labels,
        proposals_from_token_maps,
    )

    manifest = load_manifest(cache_manifest)
    extraction = manifest["settings"]
    if extraction["prompt"] != "null":
        raise ValueError(f"{cache_manifest} was extracted with the {extraction['prompt']!r} prompt; "
                         "unsupervised segmentation needs the empty prompt (protocol 'null')")
    dataset = SegmentationDataset(
        dataset_root, extraction["split"], drop_background=extraction["drop_background"], limit=extraction["limit"]
    )
    layers = manifest["layers"]
    scores = {layer: HungarianAccumulator(len(dataset.class_names), dataset.ignore_index) for layer in layers}
    proposal_counts = {layer: [] for layer in layers}
    cache_dir = Path(cache_manifest).parent
    for sample in tqdm(dataset, total=len(dataset), desc="score unsupervised", unit="image"):
        cached = read_cached_image(cache_dir, sample.image_id)
        label = crop_to_box(sample.label, cached.box)
        for position, layer in enumerate(cached.layers.tolist()):
            proposals = proposals_from_token_maps(cached.i2t[position].astype(np.float64), cached.token_grid, kl_threshold)
            proposal_counts[layer].append(len(proposals))
            scores[layer].update(cluster_labels(proposals, label.shape), label)
    noising = manifest["noising"]
    rows = []
    for layer in layers:
        result = scores[layer].compute()
        rows.append({
            "model": extraction["model"], "dataset": extraction["dataset"], "layer": layer,
            "mIoU": result["mIoU"], "pACC": result["pACC"], "mean_proposals": float(np.mean(proposal_counts[layer])),
            "images": len(dataset), "timestep_k": noising["k"], "num_steps": noising["num_steps"],
            "sigma": noising["sigma"], "prompt": "empty (null)", "resize": extraction["resize"],
            "attention": "post-softmax, head mean", "kl_threshold": kl_threshold, "seed": extraction["seed"],
            "code_version": __version__,
        })
    return pd.DataFrame(rows)
