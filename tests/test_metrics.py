"""ConfusionMatrix scores against torchmetrics and an independent float64 numpy recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
)

from seg4diff_repro.segmentation.metrics import ConfusionMatrix

C = 6
IGNORE = 255


def _random_case(seed: int, n: int = 4, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Correlated predictions (so scores are not trivial) with a horizontal ignore band."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, size=(n, h, w))
    noise = rng.integers(0, C, size=(n, h, w))
    pred = np.where(rng.random((n, h, w)) < 0.6, target, noise)
    target[:, 10:13, :] = IGNORE
    return pred, target


def _reference_scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, float]:
    """Float64 recomputation with explicit per-class masks, averaging over classes with GT pixels."""
    valid = target != IGNORE
    accs, ious = [], []
    tp_total = 0.0
    for c in range(num_classes):
        gt_c = valid & (target == c)
        pr_c = valid & (pred == c)
        tp = float(np.sum(gt_c & pr_c, dtype=np.float64))
        fp = float(np.sum(pr_c & ~gt_c, dtype=np.float64))
        fn = float(np.sum(gt_c & ~pr_c, dtype=np.float64))
        tp_total += tp
        if tp + fn > 0:
            accs.append(tp / (tp + fn))
            ious.append(tp / (tp + fp + fn))
    return {
        "pACC": 100 * tp_total / float(valid.sum()),
        "mACC": 100 * float(np.mean(accs)),
        "mIoU": 100 * float(np.mean(ious)),
    }


def test_matches_torchmetrics_when_every_class_is_in_the_target() -> None:
    pred, target = _random_case(0)
    assert set(np.unique(target)) == set(range(C)) | {IGNORE}
    cm = ConfusionMatrix(C, ignore_index=IGNORE)
    cm.update(pred, target)
    scores = cm.compute()

    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    kw = dict(num_classes=C, ignore_index=IGNORE)
    expected = {
        "pACC": 100 * MulticlassAccuracy(average="micro", **kw)(p, t).item(),
        "mACC": 100 * MulticlassAccuracy(average="macro", **kw)(p, t).item(),
        "mIoU": 100 * MulticlassJaccardIndex(average="macro", **kw)(p, t).item(),
    }
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-4), key
    # Sanity: the case is neither perfect nor chance level, so the comparison is informative.
    assert 40 < scores["pACC"] < 90

    tm_matrix = MulticlassConfusionMatrix(**kw)(p, t).numpy()  # rows = target, cols = pred
    np.testing.assert_array_equal(cm.matrix, tm_matrix)


def test_class_predicted_but_absent_from_gt_uses_gt_present_rule() -> None:
    pred, target = _random_case(1)
    target[target == 4] = 0  # class 4 is still predicted, never in the GT
    assert 4 in pred[target != IGNORE] and 4 not in target
    cm = ConfusionMatrix(C, ignore_index=IGNORE)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    scores = cm.compute()
    reference = _reference_scores(pred, target, C)
    for key in ("pACC", "mACC", "mIoU"):
        assert scores[key] == pytest.approx(reference[key], rel=1e-12), key

    iou = cm.per_class_iou()
    assert np.isnan(iou[4]) and not np.isnan(iou[[0, 1, 2, 3, 5]]).any()

    # torchmetrics' macro IoU counts the absent-but-predicted class as IoU 0, so it is lower.
    tm_miou = 100 * MulticlassJaccardIndex(num_classes=C, average="macro", ignore_index=IGNORE)(
        torch.from_numpy(pred), torch.from_numpy(target)
    ).item()
    assert tm_miou < scores["mIoU"] - 1


def test_merge_of_halves_equals_whole_and_dtypes_agree() -> None:
    pred, target = _random_case(2)
    whole = ConfusionMatrix(C)
    whole.update(pred, target)
    first, second = ConfusionMatrix(C), ConfusionMatrix(C)
    first.update(pred[:2].astype(np.uint8), target[:2].astype(np.uint8))
    second.update(torch.from_numpy(pred[2:]).to(torch.int32), torch.from_numpy(target[2:]).to(torch.int16))
    first.merge(second)
    np.testing.assert_array_equal(first.matrix, whole.matrix)
    assert first.matrix.dtype == np.int64
    assert first.matrix.sum() == int((target != IGNORE).sum())


def test_save_load_roundtrip_and_corrupt_file(tmp_path) -> None:
    pred, target = _random_case(3)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    path = tmp_path / "cm.npz"
    cm.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["cm.npz"]  # no temp file left behind
    loaded = ConfusionMatrix.load(path)
    np.testing.assert_array_equal(loaded.matrix, cm.matrix)
    assert loaded.compute() == cm.compute()

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        ConfusionMatrix.load(bad)


def test_bad_values_raise_and_ignored_pixels_are_not_checked() -> None:
    cm = ConfusionMatrix(C)
    target = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"pred .*\[7\]"):
        cm.update(np.full((4, 4), 7), target)
    with pytest.raises(ValueError, match=r"target .*\[-1\]"):
        cm.update(np.zeros((4, 4), dtype=np.int64), np.full((4, 4), -1))
    with pytest.raises(ValueError, match="float"):
        cm.update(np.zeros((4, 4), dtype=np.float32), target)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((4, 5), dtype=np.int64), target)
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(C, ignore_index=3)
    with pytest.raises(ValueError, match="no ground-truth"):
        cm.compute()
    # A pred of 255 where the target is ignored is fine (detectron2 drops those pixels).
    cm.update(np.full((2, 2), 255), np.full((2, 2), IGNORE))
    assert cm.matrix.sum() == 0
