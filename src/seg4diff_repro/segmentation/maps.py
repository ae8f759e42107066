"""From cached token maps to class maps to a label map (docs/method.md#label-prediction)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NEVER = -1e30


def _min_max(maps: np.ndarray) -> np.ndarray:
    """Min–max over pixels (the last axis), per map, as the official code: (x - min) / (max - min + 1e-6).

    The 1e-6 matters: post-softmax attention ranges are ~1e-3, so the epsilon rescales each map by a
    slightly different factor (seg4diff_model_ovss.py:215-217, 223-225).
    """
    low = maps.min(axis=-1, keepdims=True)
    high = maps.max(axis=-1, keepdims=True)
    return (maps - low) / (high - low + 1e-6)


def class_score_maps(
    token_maps: np.ndarray,
    spans: np.ndarray,
    grid: tuple[int, int],
    norm_before_merge: bool = False,
    norm_after_merge: bool = False,
    overflow: str = "official",
) -> np.ndarray:
    """[n_image_tokens, n_text] maps → [C, h, w]: each class the mean of its token columns.

    ``spans`` are already cut to the text window (`prompts.window_spans`). A class whose span is empty
    (past the window) gets, by the ``overflow`` rule, the official NaN map (the mean of an empty slice,
    which then wins every pixel's argmax) or, ``corrected``, a huge negative score that is never predicted
    (-inf would turn into NaN under bilinear interpolation).
    """
    maps = token_maps.astype(np.float32).T  # [n_text, n_image_tokens]
    if norm_before_merge:
        maps = _min_max(maps)
    empty_score = np.nan if overflow == "official" else NEVER
    scores = np.full((len(spans), maps.shape[1]), empty_score, dtype=np.float32)
    kept = np.array([end > start for start, end in spans], dtype=bool)
    for i, (start, end) in enumerate(spans):
        if kept[i]:
            scores[i] = maps[start:end].mean(axis=0)
    if norm_after_merge:
        scores[kept] = _min_max(scores[kept])
    return scores.reshape(len(spans), *grid)


def predict_labels(
    class_ids: np.ndarray, scores: np.ndarray, num_classes: int, out_shape: tuple[int, int]
) -> np.ndarray:
    """Bilinear upsampling of [C, h, w] ``scores`` to ``out_shape`` and argmax over the whole vocabulary."""
    scores = torch.from_numpy(np.ascontiguousarray(scores))[None]
    return predict_labels_batch(class_ids, scores, num_classes, out_shape)[0].numpy()


def predict_labels_batch(
    class_ids, scores: torch.Tensor, num_classes: int, out_shape: tuple[int, int]
) -> torch.Tensor:
    """[M, C, h, w] scores of the prompt's classes → [M, *out_shape] int64 labels, on the scores' device.

    As in the official code the vocabulary tensor is zero for classes missing from the prompt; the
    result equals torch's ``argmax`` of that full tensor (first maximum wins; a NaN, the official map of a
    class past the text window, beats any number) without materialising it.
    """
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if class_ids.size == 0:
        # No class in the prompt (e.g. an all-ignore label): the official tensor is all zeros → class 0.
        return torch.zeros((scores.shape[0], *out_shape), dtype=torch.int64, device=scores.device)
    # Ascending ids, so that a tie between prompt classes goes to the lowest id as in argmax.
    order = np.argsort(class_ids, kind="stable")
    ids = torch.from_numpy(class_ids[order]).to(scores.device)
    upsampled = F.interpolate(
        scores[:, torch.from_numpy(order).to(scores.device)].float(), size=tuple(out_shape), mode="bilinear",
        align_corners=False,
    )
    best_value, best_index = upsampled.max(dim=1)  # NaN propagates: the first NaN channel, as torch's argmax
    prediction = ids[best_index]
    absent = np.setdiff1d(np.arange(num_classes), class_ids)
    if absent.size:
        first_absent = int(absent[0])
        zero_wins = (best_value < 0) | ((best_value == 0) & (prediction > first_absent))
        prediction = torch.where(zero_wins, torch.tensor(first_absent, device=scores.device), prediction)
    return prediction
