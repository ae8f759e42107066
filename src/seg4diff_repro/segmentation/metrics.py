"""Semantic segmentation scores (pACC, mACC, mIoU) from an accumulated confusion matrix.

Follows detectron2's SemSegEvaluator (Seg4Diff appendix A.4): pixels whose ground truth is
the ignore index are dropped, and mACC / mIoU average only over classes that have
ground-truth pixels (the newer detectron2 rule; torchmetrics' macro averages differ when a
class is predicted but absent from the ground truth).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes


def integer_array(x: np.ndarray | torch.Tensor, what: str, *, class_indices: bool = False) -> np.ndarray:
    """``x`` (numpy or torch) as a numpy array; ValueError unless its dtype is an integer one (bool is not).

    ``class_indices``: ``x`` must hold class indices, and the error says to take the argmax of scores first.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        if class_indices:
            raise ValueError(f"{what} must have an integer dtype (class indices), got {x.dtype}; take argmax first")
        raise ValueError(f"{what} must have an integer dtype, got {x.dtype}")
    return x


def check_class_indices(num_classes: int, ignore_index: int) -> None:
    """Raise unless ``num_classes`` is a positive int and ``ignore_index`` an int outside 0..num_classes-1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} collides with class indices 0..{num_classes - 1}")


def save_npz_atomically(path: str | Path, **arrays: np.ndarray) -> None:
    """Store ``arrays`` as an uncompressed .npz that readers see whole or not at all."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_npz_arrays(
    path: str | Path, keys: Sequence[str], *, file_kind: str, written_by: str
) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the .npz at ``path``; errors cite ``file_kind`` (missing) or ``written_by`` (bad)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{file_kind} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not {written_by} ({err}); recompute it") from err


class ConfusionMatrix:
    """Accumulates a [num_classes, num_classes] int64 confusion matrix (rows = GT, cols = prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        check_class_indices(num_classes, ignore_index)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one batch/image of integer predictions and targets of the same shape."""
        p = integer_array(pred, "pred", class_indices=True)
        t = integer_array(target, "target", class_indices=True)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
        keep = t != self.ignore_index
        p = p[keep].astype(np.int64)
        t = t[keep].astype(np.int64)
        for what, values in (("target", t), ("pred", p)):
            bad = values[(values < 0) | (values >= self.num_classes)]
            if bad.size:
                raise ValueError(
                    f"{what} contains value(s) {np.unique(bad)[:10].tolist()} outside [0, {self.num_classes}) "
                    f"at non-ignored pixels (ignore_index={self.ignore_index})"
                )
        # One bincount over combined indices is much faster than np.add.at or a per-class loop.
        counts = np.bincount(self.num_classes * t + p, minlength=self.num_classes**2)
        self._counts += counts.reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same classes and ignore index."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix with num_classes={other.num_classes}, ignore_index={other.ignore_index} "
                f"into one with num_classes={self.num_classes}, ignore_index={self.ignore_index}"
            )
        self._counts += other._counts

    @property
    def matrix(self) -> np.ndarray:
        """A copy of the counts, int64 [num_classes, num_classes], rows = GT, cols = prediction."""
        return self._counts.copy()

    def per_class_iou(self) -> np.ndarray:
        """IoU per class in [0, 1] (float64); nan for classes without ground-truth pixels."""
        tp = np.diag(self._counts).astype(np.float64)
        gt = self._counts.sum(axis=1).astype(np.float64)
        pred = self._counts.sum(axis=0).astype(np.float64)
        iou = np.full(self.num_classes, np.nan)
        has_gt = gt > 0
        iou[has_gt] = tp[has_gt] / (gt + pred - tp)[has_gt]
        return iou

    def compute(self) -> dict[str, float]:
        """pACC, mACC and mIoU in percent (0-100)."""
        gt = self._counts.sum(axis=1).astype(np.float64)
        if gt.sum() == 0:
            raise ValueError("no ground-truth pixels were accumulated (all ignored or no update() calls)")
        tp = np.diag(self._counts).astype(np.float64)
        has_gt = gt > 0
        return {
            "pACC": float(100 * tp.sum() / gt.sum()),
            "mACC": float(100 * np.mean(tp[has_gt] / gt[has_gt])),
            "mIoU": float(100 * np.nanmean(self.per_class_iou())),
        }

    def save(self, path: str | Path) -> None:
        """Atomically store the counts as .npz so partial results can be merged later."""
        save_npz_atomically(path, matrix=self._counts, ignore_index=np.int64(self.ignore_index))

    @classmethod
    def load(cls, path: str | Path) -> ConfusionMatrix:
        """Load a matrix written by :meth:`save`."""
        arrays = load_npz_arrays(
            path,
            ("matrix", "ignore_index"),
            file_kind="confusion-matrix",
            written_by="a confusion-matrix .npz written by ConfusionMatrix.save",
        )
        matrix, ignore_index = arrays["matrix"], arrays["ignore_index"]
        if (
            matrix.ndim != 2
            or matrix.shape[0] != matrix.shape[1]
            or matrix.dtype != np.int64
            or (matrix < 0).any()
        ):
            raise ValueError(
                f"{path}: 'matrix' must be a square non-negative int64 array, got shape {matrix.shape} "
                f"dtype {matrix.dtype}; recompute it"
            )
        out = cls(matrix.shape[0], int(ignore_index))
        out._counts += matrix
        return out


class RunningMean:
    """Mean of a stream of numbers, mergeable and savable like the metric states (e.g. proposals per image)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.total += float(value)
        self.count += 1

    def merge(self, other: RunningMean) -> None:
        self.total += other.total
        self.count += other.count

    def compute(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def save(self, path: str | Path) -> None:
        save_npz_atomically(path, total=np.float64(self.total), count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | Path) -> RunningMean:
        arrays = load_npz_arrays(path, ("total", "count"), file_kind="running-mean",
                                 written_by="an .npz written by RunningMean.save")
        out = cls()
        out.total, out.count = float(arrays["total"]), int(arrays["count"])
        return out


class ConfusionMatrixStack:
    """``n`` confusion matrices updated together from [n, H, W] predictions of one image (e.g. every head).

    The counting runs on the predictions' device, one bincount for all ``n``; ``stack[i]`` is the i-th
    as a `ConfusionMatrix`.
    """

    def __init__(self, n: int, num_classes: int, ignore_index: int = 255) -> None:
        check_class_indices(num_classes, ignore_index)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts = np.zeros((n, num_classes, num_classes), dtype=np.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add [n, H, W] integer predictions against one [H, W] target."""
        n, c = self._counts.shape[0], self.num_classes
        if preds.shape[0] != n or preds.shape[1:] != target.shape:
            raise ValueError(f"preds shape {tuple(preds.shape)} must be [{n}, *target shape {tuple(target.shape)}]")
        keep = target != self.ignore_index
        t = target[keep].long()
        p = preds[:, keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= c or p.min() < 0 or p.max() >= c):
            raise ValueError(f"class indices outside [0, {c}) at non-ignored pixels (ignore_index={self.ignore_index})")
        offsets = torch.arange(n, device=p.device)[:, None] * c * c
        counts = torch.bincount((offsets + c * t[None] + p).reshape(-1), minlength=n * c * c)
        self._counts += counts.reshape(n, c, c).cpu().numpy()

    def __getitem__(self, index: int) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out._counts += self._counts[index]
        return out

    def merge(self, other: ConfusionMatrixStack) -> None:
        if other._counts.shape != self._counts.shape or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a stack of shape {other._counts.shape} (ignore_index={other.ignore_index}) into one "
                f"of shape {self._counts.shape} (ignore_index={self.ignore_index})"
            )
        self._counts += other._counts

    def save(self, path: str | Path) -> None:
        save_npz_atomically(path, counts=self._counts, ignore_index=np.int64(self.ignore_index))

    @classmethod
    def load(cls, path: str | Path) -> ConfusionMatrixStack:
        arrays = load_npz_arrays(path, ("counts", "ignore_index"), file_kind="confusion-matrix stack",
                                 written_by="an .npz written by ConfusionMatrixStack.save")
        counts = arrays["counts"]
        if counts.ndim != 3 or counts.shape[1] != counts.shape[2] or counts.dtype != np.int64 or (counts < 0).any():
            raise ValueError(f"{path}: 'counts' must be non-negative int64 [n, C, C], got {counts.shape} {counts.dtype}")
        out = cls(counts.shape[0], counts.shape[1], int(arrays["ignore_index"]))
        out._counts += counts
        return out
