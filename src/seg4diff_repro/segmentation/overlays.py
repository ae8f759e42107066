"""Qualitative results for the appendix overlays: predictions of the first images of a cache.

Open-vocabulary (Figs. 21–23): class maps of the analysis layer → labels, coloured by class.
Unsupervised (Figs. 24–26): KL-merged proposals → clusters; a cluster matched to a class by the
per-image Hungarian matching takes that class's colour, so that prediction and ground truth compare
at a glance, as in the appendix (which draws no labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seg4diff_repro.attention.cache import read_cached_image
from seg4diff_repro.attention.cache import load_manifest
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.prompts import window_spans
from seg4diff_repro.segmentation.unsupervised import cluster_labels, hungarian_match, proposals_from_token_maps


def overlay_rows(
    cache_manifest: Path, dataset_root: Path, layer: int, n: int, *, unsupervised: bool, kl_threshold: float = 0.1
) -> tuple[list[dict], dict[int, str], list[str]]:
    """Rows for `plot_overlays` for the first ``n`` images, the classes their ground truth shows, and the class
    names of the dataset's view (ids of labels and predictions; background dropped or not, as extracted).

    Each row: the ``image`` the model saw (its box of the original), the ``label`` and the ``prediction``
    (class ids; ``ignore_index`` marks unlabelled pixels), and a ``caption``.
    """
    manifest = load_manifest(cache_manifest)
    extraction = manifest["settings"]
    if layer not in manifest["layers"]:
        raise ValueError(f"layer {layer} is not in {cache_manifest} (cached layers {manifest['layers']})")
    dataset = SegmentationDataset(
        dataset_root, extraction["split"], background=extraction["background"], limit=extraction["limit"]
    )
    num_classes = len(dataset.class_names)
    rows, shown = [], set()
    for index in range(min(n, len(dataset))):
        sample = dataset[index]
        cached = read_cached_image(Path(cache_manifest).parent, sample.image_id)
        position = cached.layers.tolist().index(layer)
        label = dataset.label_for_scoring(crop_to_box(sample.label, cached.box))
        if unsupervised:
            proposals = proposals_from_token_maps(cached.i2t[position].astype(np.float64), cached.token_grid, kl_threshold)
            prediction = _clusters_as_classes(cluster_labels(proposals, label.shape), label, num_classes, dataset.ignore_index)
            caption = f"{sample.image_id}, {len(proposals)} proposals"
        else:
            spans = cached.local_spans(window_spans(cached.spans, manifest["text_tokens"], "official"))
            scores = class_score_maps(cached.i2t[position], spans, cached.token_grid)
            prediction = predict_labels(cached.class_ids, scores, num_classes, label.shape)
            caption = f"{sample.image_id}: \"{cached.prompt}\""
        shown |= set(np.unique(label[label != dataset.ignore_index]).tolist())
        rows.append({
            "image": crop_to_box(sample.image, cached.box),
            "label": label,
            "prediction": prediction,
            "ignore_index": dataset.ignore_index,
            "caption": caption,
        })
    return rows, {i: dataset.class_names[i] for i in sorted(shown)}, dataset.class_names


def _clusters_as_classes(clusters: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Cluster ids → the class each was matched to; unmatched clusters get ids past the class range."""
    keep = label != ignore_index
    n_cols = max(num_classes, int(clusters.max()) + 1)
    hist = np.bincount(
        n_cols * label[keep].astype(np.int64) + clusters[keep], minlength=num_classes * n_cols
    ).reshape(num_classes, n_cols)
    mapping = np.arange(num_classes, num_classes + n_cols)
    matched = hungarian_match(hist)
    present = hist.sum(axis=1) > 0  # classes absent from the image are matched to leftover columns: skip them
    mapping[matched[present]] = np.flatnonzero(present)
    return mapping[clusters]
