"""The mIoU of the supervised layer on a validation set, in memory: MAGNET's "best checkpoint" criterion.

The same forward pass, prompt, class maps and label prediction as the extraction and scoring rules
(post-softmax head-mean I2T maps, the official prompt-window rule, no normalisation), without caches: the
official trainer evaluates VOC20 every 250 iterations and keeps the best checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seg4diff_repro.attention.extract import ExtractionSettings, record_batch
from seg4diff_repro.datasets.layout import SegmentationDataset
from seg4diff_repro.models.preprocess import crop_to_box
from seg4diff_repro.progress import progress
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels
from seg4diff_repro.segmentation.metrics import ConfusionMatrix
from seg4diff_repro.segmentation.prompts import window_spans


@torch.no_grad()
def supervised_layer_miou(adapter, dataset_root: Path, settings: ExtractionSettings, layer: int,
                          batch_size: int = 8) -> float:
    """mIoU (percent) of ``layer``'s class maps on the split and view ``settings`` name."""
    dataset = SegmentationDataset(dataset_root, settings.split, background=settings.background, limit=settings.limit)
    num_classes = len(dataset.class_names)
    noising = adapter.noising(settings.timestep, settings.num_steps)
    confusion = ConfusionMatrix(num_classes, dataset.ignore_index)
    for start in progress(range(0, len(dataset), batch_size), desc=f"validation, layer {layer}", unit="batch"):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = record_batch(adapter, samples, dataset.class_names, settings, noising, [layer],
                             record=("i2t",), heads="mean")
        # [B, image tokens, prompt window], rounded to float16 as the caches the scoring rules read hold them
        maps = batch.recorder.i2t[layer][:, 0].half().float().cpu().numpy()
        for sample, prompt, box, token_maps in zip(samples, batch.prompts, batch.boxes, maps):
            label = dataset.label_for_scoring(crop_to_box(sample.label, box))
            spans = window_spans(prompt.spans, adapter.prompt_tokens, "official")
            scores = class_score_maps(token_maps, spans, adapter.token_grid)
            confusion.update(predict_labels(prompt.class_ids, scores, num_classes, label.shape), label)
    return confusion.compute()["mIoU"]
