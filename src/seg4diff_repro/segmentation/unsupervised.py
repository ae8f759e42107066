"""Unsupervised segmentation from null-prompt token maps, and its Hungarian scoring
(docs/method.md#unsupervised-protocol).

Follows the official code: ``att2mask`` and ``mask_merge`` in ``seg4diff/seg4diff_model_unsup.py``
(lines 431-503) for the proposals, and ``_fast_hist`` / ``hungarian_matching`` / ``test_unsupervised``
in ``train_net.py`` (lines 60-85, 246-326) for the PiCIE/DiffSeg-style scores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .metrics import check_class_indices, integer_array, load_npz_arrays, save_npz_atomically

# Added to the per-pixel token range before dividing (att2mask, seg4diff_model_unsup.py:431-436).
_MINMAX_EPS = 1e-6


def _positive_float(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be finite and > 0, got {value!r}")
    return float(value)


def _shape2(shape: tuple[int, int], what: str) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape)
    ):
        raise ValueError(f"{what} must be two positive ints (height, width), got {shape!r}")
    return int(shape[0]), int(shape[1])


def symmetric_kl(anchor: np.ndarray, others: np.ndarray) -> np.ndarray:
    """D(anchor, Q) = ½·Σ_p (P − Q)(log P − log Q) for each row Q of ``others``.

    ``anchor`` is one flattened distribution [n], ``others`` is [N, n]; entries must be > 0
    (the spatial softmax guarantees it). Equals ½(KL(P‖Q) + KL(Q‖P)), the official ``KL``.
    """
    anchor = np.asarray(anchor, dtype=np.float64)
    others = np.asarray(others, dtype=np.float64)
    if anchor.ndim != 1 or others.ndim != 2 or others.shape[1] != anchor.shape[0]:
        raise ValueError(f"expected anchor [n] and others [N, n], got {anchor.shape} and {others.shape}")
    if (anchor <= 0).any() or (others <= 0).any():
        raise ValueError("distributions must be strictly positive (log of zero)")
    return 0.5 * np.sum((anchor - others) * (np.log(anchor) - np.log(others)), axis=1)


def proposals_from_token_maps(
    token_maps: np.ndarray,
    grid: tuple[int, int],
    kl_threshold: float = 0.1,
    output_power: float = 1.0,
) -> np.ndarray:
    """Merge token attention maps [h·w, T] (T = 77 in the paper) into M proposal distributions [M, h, w].

    Per-pixel min–max across tokens, power, row-major reshape to T×h×w, spatial softmax, then one
    greedy symmetric-KL pass: each unassigned anchor i (in order) groups every map j with
    D(i, j) < ``kl_threshold`` — assigned maps included, so groups may overlap — and emits the
    group's mean distribution. Computed in float64. τ must be > 0: the official code skips anchors
    whose group is empty, and D(i, i) = 0 is not < 0, so τ = 0 would yield no proposals at all.
    """
    maps = np.asarray(token_maps)
    if maps.ndim != 2 or maps.shape[1] < 1:
        raise ValueError(f"token_maps must be [n_image_tokens, n_text_tokens], got shape {maps.shape}")
    if not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise ValueError(f"token_maps must be numeric, got dtype {maps.dtype}")
    h, w = _shape2(grid, "grid")
    if maps.shape[0] != h * w:
        raise ValueError(f"token_maps has {maps.shape[0]} image tokens but grid {grid} needs {h * w}")
    tau = _positive_float(kl_threshold, "kl_threshold")
    power = _positive_float(output_power, "output_power")
    maps = maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise ValueError("token_maps contains non-finite values")

    # att2mask normalises dim 2 of [B, HW, T], i.e. across tokens at each pixel, in this order.
    maps = maps - maps.min(axis=1, keepdims=True)
    maps = maps / (maps.max(axis=1, keepdims=True) + _MINMAX_EPS)
    maps = maps**power

    # "b (h w) l -> b l h w" is a transpose then a row-major reshape; keep it flat [T, h*w] here.
    flat = maps.T
    flat = np.exp(flat - flat.max(axis=1, keepdims=True))
    probs = flat / flat.sum(axis=1, keepdims=True)

    assigned = np.zeros(probs.shape[0], dtype=bool)
    proposals = []
    for i in range(probs.shape[0]):
        if assigned[i]:
            continue
        group = symmetric_kl(probs[i], probs) < tau  # against all maps, as the official code does
        assigned |= group
        proposals.append(probs[group].mean(axis=0))
    return np.stack(proposals).reshape(-1, h, w)


def cluster_labels(proposals: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample proposals [M, h, w] to ``out_shape`` (align_corners=False) and argmax → int64 [H, W]."""
    props = np.asarray(proposals)
    if props.ndim != 3 or min(props.shape) < 1:
        raise ValueError(f"proposals must be a non-empty [M, h, w] array, got shape {props.shape}")
    if not np.issubdtype(props.dtype, np.floating):
        raise ValueError(f"proposals must be floating point, got dtype {props.dtype}")
    out_h, out_w = _shape2(out_shape, "out_shape")
    t = torch.from_numpy(np.ascontiguousarray(props))[None]
    up = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0).numpy().astype(np.int64)


def official_cluster_labels(
    proposals: np.ndarray, original_shape: tuple[int, int], resized: tuple[int, int]
) -> np.ndarray:
    """Cluster ids at the test mapper's resized size, by the official code's route
    (docs/method.md#unsupervised-protocol, step 6).

    Proposals are upsampled to the original image size; ``sem_seg_postprocess`` then keeps the top-left
    ``resized`` region and resizes it to ``resized``. Where the original is larger than the resized
    image (Cityscapes: 1024×2048 → 640×1280) that keeps a top-left crop instead of the whole image:
    the official quirk, reproduced because the paper's numbers come from it.
    """
    props = torch.from_numpy(np.ascontiguousarray(np.asarray(proposals, dtype=np.float32)))[None]
    height, width = _shape2(resized, "resized")
    full = F.interpolate(props, size=_shape2(original_shape, "original_shape"), mode="bilinear", align_corners=False)
    kept = full[:, :, :height, :width]
    return F.interpolate(kept, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(dim=0).numpy()


def hungarian_match(hist: np.ndarray) -> np.ndarray:
    """For an overlap histogram [num_classes, n_cols] (n_cols ≥ num_classes), the column matched to each class.

    scipy's ``linear_sum_assignment`` maximising the total overlap, as in ``hungarian_matching``.
    """
    hist = np.asarray(hist)
    if hist.ndim != 2 or hist.shape[1] < hist.shape[0]:
        raise ValueError(f"hist must be [num_classes, n_cols] with n_cols >= num_classes, got {hist.shape}")
    # With n_cols >= n_rows every row is assigned and the row indices come back as 0..n-1 in order.
    _, cols = linear_sum_assignment(hist, maximize=True)
    return cols.astype(np.int64)


_STATE_KEYS = ("tp", "fp", "fn", "n_pixels", "n_ignored", "n_out_of_range", "n_images")

#: ``per_row``: the official trainer passes one [H, W] map to ``hungarian_matching``, whose loop runs over the
#: first axis, so each image ROW gets its own histogram and assignment (train_net.py:69-85, 287): the protocol
#: behind the paper's Table 2, and a bug. ``per_image``: one matching per image, as PiCIE/DiffSeg intend.
MATCHING = ("per_row", "per_image")


class HungarianAccumulator:
    """Hungarian matching of cluster ids to classes (per image row or per image), TP/FP/FN summed over a dataset.

    Pixels whose label is outside [0, num_classes) are dropped, as in ``_fast_hist``; those equal to
    ``ignore_index`` are counted as ``n_ignored`` and any others as ``n_out_of_range`` so that
    unexpected labels (e.g. ≥ 59 on PC59) are visible rather than silently lost.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, matching: str = "per_row") -> None:
        check_class_indices(num_classes, ignore_index)
        if matching not in MATCHING:
            raise ValueError(f"matching={matching!r}: use one of {list(MATCHING)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matching = matching
        self.tp = np.zeros(num_classes, dtype=np.int64)
        self.fp = np.zeros(num_classes, dtype=np.int64)
        self.fn = np.zeros(num_classes, dtype=np.int64)
        self.n_pixels = 0
        self.n_ignored = 0
        self.n_out_of_range = 0
        self.n_images = 0

    def _checked(
        self, clusters: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validated integer numpy views of one image's cluster map and label map."""
        pred = integer_array(clusters, "clusters")
        gt = integer_array(label, "label")
        if pred.ndim != 2 or pred.shape != gt.shape:
            raise ValueError(f"clusters shape {pred.shape} and label shape {gt.shape} must be the same [H, W]")
        if pred.size == 0:
            raise ValueError(f"empty cluster map of shape {pred.shape}")
        lo = int(pred.min())
        if lo < 0:
            raise ValueError(f"cluster ids must be >= 0, got minimum {lo}")
        return pred, gt

    def _histogram(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """Overlap counts H[g, k], int64 [num_classes, max(num_classes, pred.max() + 1)]."""
        # Column count uses the max over all pixels, ignored ones included, as _fast_hist does; it
        # can change which empty column an absent class is matched to, hence its FP.
        n_cols = max(self.num_classes, int(pred.max()) + 1)
        keep = (gt >= 0) & (gt < self.num_classes)
        idx = n_cols * gt[keep].astype(np.int64) + pred[keep].astype(np.int64)
        return np.bincount(idx, minlength=self.num_classes * n_cols).reshape(self.num_classes, n_cols)

    def _add_matched(self, hist: np.ndarray) -> None:
        cols = hungarian_match(hist)
        matched = hist[np.arange(self.num_classes), cols]
        self.tp += matched
        # Pixels of clusters no class was matched to stay in their row sums: they count as FN.
        self.fn += hist.sum(axis=1) - matched
        self.fp += hist.sum(axis=0)[cols] - matched
        self.n_pixels += int(hist.sum())

    def update(self, clusters: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Match one image's cluster map [H, W] to its label map [H, W] and add its TP/FP/FN."""
        pred, gt = self._checked(clusters, label)
        n_counted = self.n_pixels
        if self.matching == "per_image":
            self._add_matched(self._histogram(pred, gt))
        else:
            for pred_row, gt_row in zip(pred, gt):  # official: `for i in range(pred.shape[0])` over rows
                self._add_matched(self._histogram(pred_row, gt_row))
        n_counted = self.n_pixels - n_counted
        n_ignored = int(np.count_nonzero(gt == self.ignore_index))
        self.n_ignored += n_ignored
        self.n_out_of_range += gt.size - n_counted - n_ignored
        self.n_images += 1

    def merge(self, other: HungarianAccumulator) -> None:
        """Add the counts of another accumulator with the same classes and ignore index."""
        settings = (self.num_classes, self.ignore_index, self.matching)
        if (other.num_classes, other.ignore_index, other.matching) != settings:
            raise ValueError(
                f"cannot merge an accumulator with num_classes={other.num_classes}, ignore_index="
                f"{other.ignore_index}, matching={other.matching} into one with num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}, matching={self.matching}"
            )
        for key in _STATE_KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def per_class_iou(self) -> np.ndarray:
        """TP/(TP+FP+FN) per class in [0, 1] (float64); nan where the denominator is 0."""
        denom = (self.tp + self.fp + self.fn).astype(np.float64)
        iou = np.full(self.num_classes, np.nan)
        np.divide(self.tp, denom, out=iou, where=denom > 0)
        return iou

    def compute(self) -> dict[str, float | int | list[float]]:
        """mIoU (nanmean over classes) and pixel accuracy in percent, per-class IoU (%), and pixel counts."""
        if self.n_pixels == 0:
            raise ValueError("no labelled pixels were accumulated (all ignored/out of range, or no update() calls)")
        iou = 100 * self.per_class_iou()
        return {
            "mIoU": float(np.nanmean(iou)),
            "pACC": float(100 * self.tp.sum() / self.n_pixels),
            "per_class_IoU": [float(v) for v in iou],
            "n_images": self.n_images,
            "n_pixels": self.n_pixels,
            "n_ignored": self.n_ignored,
            "n_out_of_range": self.n_out_of_range,
        }

    def save(self, path: str | Path) -> None:
        """Atomically store the counts as .npz so shards can be merged or resumed."""
        state = {key: np.asarray(getattr(self, key), dtype=np.int64) for key in _STATE_KEYS}
        save_npz_atomically(
            path, num_classes=np.int64(self.num_classes), ignore_index=np.int64(self.ignore_index),
            per_row=np.int64(self.matching == "per_row"), **state,
        )

    @classmethod
    def load(cls, path: str | Path) -> HungarianAccumulator:
        """Load an accumulator written by :meth:`save`."""
        arrays = load_npz_arrays(
            path,
            ("num_classes", "ignore_index", "per_row", *_STATE_KEYS),
            file_kind="Hungarian accumulator",
            written_by="an .npz written by HungarianAccumulator.save",
        )
        matching = "per_row" if int(arrays["per_row"]) else "per_image"
        out = cls(int(arrays["num_classes"]), int(arrays["ignore_index"]), matching)
        for key in _STATE_KEYS:
            value = arrays[key]
            expected = (out.num_classes,) if key in ("tp", "fp", "fn") else ()
            if value.shape != expected or value.dtype != np.int64 or (value < 0).any():
                raise ValueError(
                    f"{path}: '{key}' must be non-negative int64 of shape {expected}, got shape "
                    f"{value.shape} dtype {value.dtype}; recompute it"
                )
            setattr(out, key, value.copy() if expected else int(value))
        return out
