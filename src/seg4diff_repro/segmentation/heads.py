"""Per-(layer, head) segmentation scores (appendix Fig. 4), accumulated while streaming.

Caching every head's maps would take 24 × 24 maps per image; instead each forward pass records the
per-head post-softmax I2T maps of every layer, turns each head's maps into a label map on the
device, and adds it to that (layer, head)'s confusion matrix. The matrices are kept per shard of
images (`segmentation/shards.py`), so a killed GPU job resumes with the shards it had finished.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seg4diff_repro.attention.cache import settings_key
from seg4diff_repro.attention.extract import ExtractionSettings, extraction_inputs, record_batch
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.models import load_adapter
from seg4diff_repro.models.common import adapter_record
from seg4diff_repro.models.preprocess import crop_to_box
from seg4diff_repro.provenance import code_fingerprint, provenance, provenance_label
from seg4diff_repro.segmentation.maps import predict_labels_batch
from seg4diff_repro.segmentation.metrics import ConfusionMatrixStack, RunningMean
from seg4diff_repro.segmentation.prompts import overflowing_classes, window_spans
from seg4diff_repro.segmentation.score import lora_columns
from seg4diff_repro.segmentation.shards import accumulate_in_shards

log = logging.getLogger(__name__)


def class_scores_per_map(token_maps: torch.Tensor, spans: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """[M, n_image_tokens, n_text] maps → [M, C, h, w]: each class the mean of its span's columns.

    The batched counterpart of `maps.class_score_maps` without normalisation (Fig. 4 scores the
    post-softmax maps as they are), under the official overflow rule: ``spans`` are cut to the window
    by `prompts.window_spans`, and an empty one (a class past the window) is the official NaN map.
    """
    scores = torch.full((token_maps.shape[0], len(spans), token_maps.shape[1]), torch.nan, device=token_maps.device)
    for index, (start, end) in enumerate(spans):
        if end > start:
            scores[:, index] = token_maps[:, :, start:end].float().mean(dim=-1)
    return scores.reshape(token_maps.shape[0], len(spans), *grid)


def score_heads(
    settings: ExtractionSettings,
    dataset_root: Path,
    shard_root: Path,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    shard_size: int = 32,
    adapter=None,
) -> pd.DataFrame:
    """pACC, mACC and mIoU (percent) of every (layer, head) of the model; one row per pair.

    ``adapter``: an already loaded model of ``settings`` (benchmarks time the loop without the load).
    """
    dataset = SegmentationDataset(
        dataset_root, settings.split, background=settings.background, limit=settings.limit
    )
    if adapter is None:
        adapter = load_adapter(settings.backbone, settings.source, settings.dtype, device, settings.revision,
                               lora=settings.lora,
                               **dict(settings.model_options))
    noising = adapter.noising(settings.timestep, settings.num_steps)
    layers = list(range(adapter.num_layers)) if settings.layers is None else list(settings.layers)
    heads = adapter.transformer.config.num_attention_heads
    num_classes = len(dataset.class_names)
    log.info("%s: %d layers x %d heads on %d images (t = %d of %d, sigma %.5f)",
             shard_root, len(layers), heads, len(dataset), noising.k, noising.num_steps, noising.sigma)

    def add_images(accumulators: dict[str, ConfusionMatrixStack], positions: range) -> None:
        for start in range(positions.start, positions.stop, batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, positions.stop))]
            batch = record_batch(
                adapter, samples, dataset.class_names, settings, noising, layers, record=("i2t",), heads=None
            )
            for b, sample in enumerate(samples):
                prompt = batch.prompts[b]
                label = dataset.label_for_scoring(crop_to_box(sample.label, batch.boxes[b]))
                label = torch.from_numpy(label.astype(np.int64)).to(adapter.device)
                accumulators["overflow_images"].update(overflowing_classes(prompt.spans, adapter.prompt_tokens) > 0)
                spans = np.array(window_spans(prompt.spans, adapter.prompt_tokens, "official")).reshape(-1, 2)
                for layer in layers:
                    scores = class_scores_per_map(batch.recorder.i2t[layer][b], spans, adapter.token_grid)
                    predictions = predict_labels_batch(prompt.class_ids, scores, num_classes, tuple(label.shape))
                    accumulators[f"layer_{layer:03d}"].update(predictions, label)

    inputs = extraction_inputs(settings, dataset_root)
    merged = accumulate_in_shards(
        dataset.ids, shard_root,
        settings_key({**asdict(settings), **inputs, "code_fingerprint": code_fingerprint("scoring")}), shard_size,
        lambda: {
            **{f"layer_{layer:03d}": ConfusionMatrixStack(heads, num_classes, dataset.ignore_index)
               for layer in layers},
            "overflow_images": RunningMean(),
        },
        add_images, "score heads",
    )
    rows = [
        {
            "model": settings.model, "dataset": settings.dataset, "layer": layer, "head": head,
            **merged[f"layer_{layer:03d}"][head].compute(),
            "images": len(dataset), "timestep_k": noising.k, "num_steps": noising.num_steps, "sigma": noising.sigma,
            "prompt": settings.prompt, "prompt_classes_from": settings.prompt_classes_from,
            "background": settings.background, "prompt_overflow": "official",
            "overflow_images": int(merged["overflow_images"].total),
            "resize": settings.resize, "attention": "post-softmax, single head",
            "seed": settings.seed, "model_source": settings.source, "model_revision": settings.revision,
            "model_fingerprint": inputs["model_fingerprint"],  # the resolved commit of a hub id
            **lora_columns(None if settings.lora is None else adapter_record(settings.lora)),
            "code_version": provenance_label(provenance("scoring")),
        }
        for layer in layers
        for head in range(heads)
    ]
    return pd.DataFrame(rows)

