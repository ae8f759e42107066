"""Unsupervised proposals (KL merging) and Hungarian scoring against hand-built cases and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import rel_entr, softmax

from seg4diff_repro.segmentation.unsupervised import (
    HungarianAccumulator,
    cluster_labels,
    hungarian_match,
    proposals_from_token_maps,
    symmetric_kl,
)

IGNORE = 255


# ----------------------------------------------------------------------------- references


def _ref_distributions(token_maps: np.ndarray, grid: tuple[int, int], power: float = 1.0) -> np.ndarray:
    """Float64 restatement of §D.1 steps 3-5a: per-pixel token min–max, power, row-major, spatial softmax."""
    x = token_maps.astype(np.float64)
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    x = ((x - lo) / (hi - lo + 1e-6)) ** power
    maps = np.stack([x[:, t].reshape(grid) for t in range(x.shape[1])])  # row-major per token
    return softmax(maps.reshape(len(maps), -1), axis=1)


def _ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    """½(KL(p‖q) + KL(q‖p)) in float64 via scipy."""
    return 0.5 * float(rel_entr(p, q).sum() + rel_entr(q, p).sum())


def _stripes(seed: int, grid: tuple[int, int] = (8, 12)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """77 noisy copies of 3 vertical stripes: (token_maps [h*w, 77], stripe of each token, stripe map)."""
    rng = np.random.default_rng(seed)
    h, w = grid
    stripe_map = np.repeat(np.arange(3), w // 3)[None, :].repeat(h, axis=0)
    token_stripe = rng.permutation(np.arange(77) % 3)
    token_maps = (stripe_map.reshape(-1, 1) == token_stripe[None, :]).astype(np.float64)
    token_maps += 0.05 * rng.random(token_maps.shape)
    return token_maps, token_stripe, stripe_map


def _ref_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel (align_corners=False) bilinear resize of [M, h, w] in float64, written out per axis."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        mat = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            frac = src - i0
            mat[o, i0] += 1 - frac
            mat[o, i1] += frac
        return mat

    wy, wx = weights(x.shape[1], out_h), weights(x.shape[2], out_w)
    return np.einsum("oh,mhw,pw->mop", wy, x, wx)


def _injections(n_rows: int, n_cols: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(n_cols), n_rows))


def _rule_counts(hist: np.ndarray, cols: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
    """TP/FP/FN per class for a given class→column assignment, restating §D.1 step 8 with plain loops."""
    tp, fp, fn = [], [], []
    for g, k in enumerate(cols):
        overlap = int(hist[g, k])
        tp.append(overlap)
        fn.append(int(sum(hist[g, :])) - overlap)
        fp.append(int(sum(hist[:, k])) - overlap)
    return tp, fp, fn


def _image_from_hist(hist: np.ndarray, rng: np.random.Generator, extra: list[tuple[int, int, int]] = ()):
    """Shuffled (clusters, label) maps of shape [1, n] whose overlap counts are ``hist``.

    ``extra`` adds (label, cluster, count) pixels, used for ignore/out-of-range labels.
    """
    g, k = np.indices(hist.shape)
    counts = hist.ravel().tolist() + [n for _, _, n in extra]
    labels = np.repeat(g.ravel().tolist() + [e[0] for e in extra], counts)
    clusters = np.repeat(k.ravel().tolist() + [e[1] for e in extra], counts)
    order = rng.permutation(len(labels))
    return clusters[order][None, :], labels[order][None, :]


# ----------------------------------------------------------------------------- proposals


def test_noisy_copies_of_three_stripes_merge_into_three_proposals() -> None:
    grid = (8, 12)  # not square, so a column-major reshape would scramble the stripes
    token_maps, token_stripe, stripe_map = _stripes(0, grid)
    ref = _ref_distributions(token_maps, grid)
    same = token_stripe[:, None] == token_stripe[None, :]
    d = np.array([[_ref_kl(p, q) for q in ref] for p in ref])
    # The case is only meaningful if τ = 0.1 separates within- from across-stripe distances.
    assert d[same].max() < 0.1 < d[~same].min()

    props = proposals_from_token_maps(token_maps, grid)
    assert props.shape == (3, *grid)
    # Proposals come in the order the stripes first appear among the tokens.
    first_seen = list(dict.fromkeys(token_stripe.tolist()))
    for k, s in enumerate(first_seen):
        np.testing.assert_allclose(props[k].ravel(), ref[token_stripe == s].mean(axis=0), rtol=1e-12)
        assert props[k].sum() == pytest.approx(1.0, abs=1e-12)
    expected_labels = np.argsort(first_seen)[stripe_map]
    np.testing.assert_array_equal(cluster_labels(props, grid), expected_labels)


def test_tiny_threshold_keeps_every_map_and_huge_threshold_merges_all() -> None:
    grid = (8, 12)
    token_maps, _, _ = _stripes(1, grid)
    ref = _ref_distributions(token_maps, grid)

    singles = proposals_from_token_maps(token_maps, grid, kl_threshold=1e-12)
    assert singles.shape == (77, *grid)
    np.testing.assert_allclose(singles.reshape(77, -1), ref, rtol=1e-12)

    one = proposals_from_token_maps(token_maps, grid, kl_threshold=1e6)
    assert one.shape == (1, *grid)
    np.testing.assert_allclose(one[0].ravel(), ref.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_threshold_is_rejected(bad: float) -> None:
    # The official code needs D(i, i) = 0 < τ to emit a proposal; τ <= 0 would emit none.
    token_maps, _, _ = _stripes(2)
    with pytest.raises(ValueError, match="kl_threshold"):
        proposals_from_token_maps(token_maps, (8, 12), kl_threshold=bad)


def test_min_max_runs_across_tokens_at_each_pixel_not_across_pixels() -> None:
    grid = (6, 6)
    blob = np.zeros(grid)
    blob[1:4, 2:6] = 1.0
    # A: strong blob, B: the same blob 100× weaker, C: constant. Normalising each token over its
    # pixels would make A and B identical; normalising each pixel over tokens makes B flat.
    token_maps = np.stack([blob.ravel(), 0.01 * blob.ravel(), np.full(blob.size, 0.1)], axis=1)
    tau = 0.05

    ref = _ref_distributions(token_maps, grid)
    per_token = token_maps - token_maps.min(axis=0)
    per_token = per_token / (per_token.max(axis=0) + 1e-6)
    alt = softmax(per_token.T, axis=1)
    assert _ref_kl(alt[0], alt[1]) < tau  # the wrong direction would merge A and B ...
    assert min(_ref_kl(ref[0], ref[1]), _ref_kl(ref[0], ref[2]), _ref_kl(ref[1], ref[2])) > tau  # ... the right one not

    props = proposals_from_token_maps(token_maps, grid, kl_threshold=tau)
    assert props.shape == (3, *grid)
    np.testing.assert_allclose(props.reshape(3, -1), ref, rtol=1e-12)


def test_output_power_is_applied_after_the_min_max() -> None:
    token_maps, _, _ = _stripes(3)
    ref = _ref_distributions(token_maps, (8, 12), power=2.5)
    props = proposals_from_token_maps(token_maps, (8, 12), kl_threshold=1e-12, output_power=2.5)
    np.testing.assert_allclose(props.reshape(77, -1), ref, rtol=1e-12)


def test_symmetric_kl_matches_rel_entr() -> None:
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(50))
    others = rng.dirichlet(np.ones(50), size=6)
    expected = [_ref_kl(p, q) for q in others]
    np.testing.assert_allclose(symmetric_kl(p, others), expected, rtol=1e-12)
    assert symmetric_kl(p, p[None])[0] == 0.0


def test_merging_threshold_compares_against_the_symmetric_kl_value() -> None:
    rng = np.random.default_rng(5)
    grid = (8, 8)
    token_maps = rng.random((64, 2))
    ref = _ref_distributions(token_maps, grid)
    d = _ref_kl(ref[0], ref[1])
    merged = proposals_from_token_maps(token_maps, grid, kl_threshold=d * (1 + 1e-9))
    split = proposals_from_token_maps(token_maps, grid, kl_threshold=d * (1 - 1e-9))
    assert merged.shape[0] == 1 and split.shape[0] == 2
    np.testing.assert_allclose(merged[0].ravel(), ref.mean(axis=0), rtol=1e-12)


def test_groups_include_already_assigned_maps() -> None:
    grid = (8, 8)
    ramp = np.linspace(0.0, 1.0, 64)
    # Tokens 3 (all 0) and 4 (all 1) pin every pixel's min and max, so tokens 0-2 keep their values.
    token_maps = np.stack([0.0 * ramp, 0.5 * ramp, 1.0 * ramp, np.zeros(64), np.ones(64)], axis=1)
    ref = _ref_distributions(token_maps, grid)
    tau = 0.02
    d = {(i, j): _ref_kl(ref[i], ref[j]) for i in range(5) for j in range(5)}
    assert d[0, 1] < tau and d[1, 2] < tau and d[0, 3] < tau and d[0, 4] < tau
    assert d[0, 2] > tau and d[2, 3] > tau and d[2, 4] > tau

    props = proposals_from_token_maps(token_maps, grid, kl_threshold=tau)
    assert props.shape == (2, *grid)
    np.testing.assert_allclose(props[0].ravel(), ref[[0, 1, 3, 4]].mean(axis=0), rtol=1e-12)
    # Anchor 2 re-uses map 1, which anchor 0 had already claimed: groups may overlap.
    np.testing.assert_allclose(props[1].ravel(), ref[[1, 2]].mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize(
    ("maps", "grid", "match"),
    [
        (np.zeros((96, 77)), (8, 8), "grid"),
        (np.zeros((77, 96)), (8, 12), "grid"),
        (np.zeros(96), (8, 12), "token_maps"),
        (np.zeros((96, 77)), (8, 12.0), "grid"),
        (np.full((96, 77), np.nan), (8, 12), "non-finite"),
    ],
)
def test_bad_token_maps_are_rejected(maps: np.ndarray, grid: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        proposals_from_token_maps(maps, grid)


@pytest.mark.parametrize("out_shape", [(13, 11), (3, 4), (5, 7)])
def test_cluster_labels_match_a_float64_bilinear_reference(out_shape: tuple[int, int]) -> None:
    props = np.random.default_rng(6).random((4, 5, 7))
    expected = _ref_bilinear(props, *out_shape).argmax(axis=0)
    labels = cluster_labels(props, out_shape)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_cluster_labels_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"out_shape"):
        cluster_labels(np.ones((2, 4, 4)), (0, 4))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        cluster_labels(np.ones((4, 4)), (8, 8))


# ----------------------------------------------------------------------------- Hungarian scoring


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_clusters", [3, 4, 5, 6])
def test_matching_reaches_the_brute_force_maximum(seed: int, n_clusters: int) -> None:
    rng = np.random.default_rng(seed)
    hist = np.zeros((4, max(4, n_clusters)), dtype=np.int64)
    hist[:, :n_clusters] = rng.integers(0, 30, size=(4, n_clusters))
    hist[rng.integers(0, 4)] = 0  # a class absent from the image
    cols = hungarian_match(hist)
    assert len(set(cols.tolist())) == 4
    best = max(sum(hist[g, k] for g, k in enumerate(inj)) for inj in _injections(4, hist.shape[1]))
    assert hist[np.arange(4), cols].sum() == best


@pytest.mark.parametrize("seed", range(5))
def test_accumulated_counts_equal_the_rules_for_the_optimal_matching(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    acc = HungarianAccumulator(4, ignore_index=IGNORE)
    tp, fp, fn = np.zeros(4, int), np.zeros(4, int), np.zeros(4, int)
    counted = 0
    for n_clusters in (3, 5, 6):
        hist = np.zeros((4, max(4, n_clusters)), dtype=np.int64)
        # Distinct counts make ties between matchings unlikely; the assert below checks it.
        hist[:, :n_clusters] = rng.choice(1000, size=(4, n_clusters), replace=False)
        # Ignore and out-of-range pixels (label 7) of a new cluster id add an empty column only.
        extra = [(IGNORE, n_clusters, 9), (7, n_clusters + 1, 4)]
        padded = np.pad(hist, ((0, 0), (0, max(0, n_clusters + 2 - hist.shape[1]))))
        optima: dict[int, set] = {}
        for inj in _injections(4, padded.shape[1]):
            total = sum(padded[g, k] for g, k in enumerate(inj))
            optima.setdefault(total, set()).add(tuple(map(tuple, _rule_counts(padded, inj))))
        outcomes = optima[max(optima)]
        assert len(outcomes) == 1, "the case must have one optimal outcome to be checkable"
        (rule_tp, rule_fp, rule_fn), = outcomes
        tp, fp, fn = tp + rule_tp, fp + rule_fp, fn + rule_fn
        counted += int(hist.sum())
        acc.update(*_image_from_hist(hist, rng, extra))

    np.testing.assert_array_equal(acc.tp, tp)
    np.testing.assert_array_equal(acc.fp, fp)
    np.testing.assert_array_equal(acc.fn, fn)
    scores = acc.compute()
    assert (scores["n_pixels"], scores["n_ignored"], scores["n_out_of_range"]) == (counted, 27, 12)
    assert scores["pACC"] == pytest.approx(100 * tp.sum() / counted)


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 0 on 6 pixels split over clusters 0 (4) and 2 (2); class 1 on 4 pixels, all cluster 1."""
    label = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    clusters = np.array([[0, 0, 0, 0, 2, 2, 1, 1, 1, 1]])
    return clusters, label


def test_pixels_of_an_unmatched_proposal_are_false_negatives() -> None:
    acc = HungarianAccumulator(2)
    acc.update(*_hand_case())
    # Columns: max(2, 3) = 3; cluster 2 is left unmatched, so its 2 pixels are FN for class 0.
    assert (acc.tp.tolist(), acc.fp.tolist(), acc.fn.tolist()) == ([4, 4], [0, 0], [2, 0])
    scores = acc.compute()
    assert scores["per_class_IoU"] == pytest.approx([100 * 4 / 6, 100.0])
    assert scores["mIoU"] == pytest.approx(100 * (4 / 6 + 1) / 2)
    assert scores["pACC"] == pytest.approx(80.0)


def test_miou_is_a_nanmean_and_absent_classes_absorb_leftover_clusters() -> None:
    acc = HungarianAccumulator(4)
    acc.update(*_hand_case())
    # With 4 rows and 4 columns, cluster 2 must go to absent class 2 or 3: FP 2 for that class, and
    # the other absent class has TP + FP + FN = 0, so its IoU is nan and drops out of the mean.
    iou = acc.compute()["per_class_IoU"]
    assert iou[:2] == pytest.approx([100 * 4 / 6, 100.0])
    assert sorted(iou[2:], key=np.isnan)[0] == 0.0 and sum(np.isnan(iou[2:])) == 1
    assert acc.compute()["mIoU"] == pytest.approx(100 * (4 / 6 + 1 + 0) / 3)
    assert acc.fn.tolist() == [2, 0, 0, 0] and acc.fp.sum() == 2


def test_ignore_and_out_of_range_pixels_are_excluded() -> None:
    clusters, label = _hand_case()
    # 20 ignored pixels and 5 with label 2 (out of range for 2 classes), all on cluster 1: counted,
    # they would make cluster 1 a worse match for class 1 and add FP.
    clusters = np.concatenate([clusters, np.ones((1, 25), dtype=int)], axis=1)
    label = np.concatenate([label, np.full((1, 20), IGNORE), np.full((1, 5), 2)], axis=1).astype(np.uint8)
    acc = HungarianAccumulator(2, ignore_index=IGNORE)
    acc.update(clusters, label)
    assert (acc.tp.tolist(), acc.fp.tolist(), acc.fn.tolist()) == ([4, 4], [0, 0], [2, 0])
    scores = acc.compute()
    assert (scores["n_pixels"], scores["n_ignored"], scores["n_out_of_range"]) == (10, 20, 5)


def _random_images(seed: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = rng.integers(0, 5, size=(12, 10))
        label[rng.random(label.shape) < 0.1] = IGNORE
        clusters = np.where(rng.random(label.shape) < 0.7, (label * 3 + 1) % 7, rng.integers(0, 7, label.shape))
        out.append((clusters, label))
    return out


def test_merge_of_two_halves_equals_the_whole_and_save_load_round_trips(tmp_path) -> None:
    images = _random_images(7, 6)
    whole, first, second = (HungarianAccumulator(5) for _ in range(3))
    for i, (clusters, label) in enumerate(images):
        whole.update(clusters, label)
        (first if i < 3 else second).update(clusters, label)
    path = tmp_path / "shard" / "second.npz"
    second.save(path)
    first.merge(HungarianAccumulator.load(path))
    for key in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(getattr(first, key), getattr(whole, key))
    assert first.compute() == whole.compute()
    assert whole.compute()["n_images"] == 6 and whole.tp.sum() > 0 and whole.fp.sum() > 0


def _official_hungarian_matching(pred: np.ndarray, label: np.ndarray, n_class: int):
    """train_net.py:60-85 restated: `_fast_hist` and `hungarian_matching`, looping over the first axis of pred."""
    tp, fp, fn = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class)
    total = 0
    for i in range(pred.shape[0]):
        label_true, label_pred = label[i].flatten(), pred[i].flatten()
        pred_n_class = np.maximum(n_class, label_pred.max() + 1)
        mask = (label_true >= 0) & (label_true < n_class)
        hist = np.bincount(pred_n_class * label_true[mask] + label_pred[mask],
                           minlength=n_class * pred_n_class).reshape(n_class, pred_n_class)
        row_ind, col_ind = linear_sum_assignment(hist, maximize=True)
        total += hist.sum()
        fn += np.sum(hist, 1) - hist[row_ind, col_ind]
        tp += hist[row_ind, col_ind]
        hist = hist[:, col_ind]
        fp += np.sum(hist, 0) - np.diag(hist)
    return tp, fp, fn, total


def test_official_matching_is_per_row_minimal_case() -> None:
    """Issue 11 item 4: GT [[0,1],[0,1]], clusters [[0,1],[1,0]]: per image 33.33 mIoU, per row (official) 100."""
    label = np.array([[0, 1], [0, 1]])
    clusters = np.array([[0, 1], [1, 0]])
    official = HungarianAccumulator(2)  # the default reproduces the official trainer
    official.update(clusters, label)
    assert official.matching == "per_row"
    assert official.compute()["mIoU"] == pytest.approx(100.0)
    per_image = HungarianAccumulator(2, matching="per_image")
    per_image.update(clusters, label)
    # By hand: every matching of the 2x2 all-ones histogram gives TP = FP = FN = 1 per class, IoU 1/3.
    assert (per_image.tp.tolist(), per_image.fp.tolist(), per_image.fn.tolist()) == ([1, 1], [1, 1], [1, 1])
    assert per_image.compute()["mIoU"] == pytest.approx(100 / 3)
    tp, fp, fn, _ = _official_hungarian_matching(clusters, label, 2)
    assert (official.tp.tolist(), official.fp.tolist(), official.fn.tolist()) == (tp.tolist(), fp.tolist(), fn.tolist())


@pytest.mark.parametrize("matching", ["per_row", "per_image"])
def test_counts_equal_the_official_function_given_rows_or_the_whole_image(matching: str) -> None:
    """per_row = the official call on one [H, W] map; per_image = the same function given a batch of one [1, H, W]."""
    acc = HungarianAccumulator(5, ignore_index=IGNORE, matching=matching)
    tp, fp, fn, total = np.zeros(5), np.zeros(5), np.zeros(5), 0
    for clusters, label in _random_images(11, 5):
        acc.update(clusters, label)
        pred, gt = (clusters, label) if matching == "per_row" else (clusters[None], label[None])
        counts = _official_hungarian_matching(pred, gt, 5)
        tp, fp, fn, total = tp + counts[0], fp + counts[1], fn + counts[2], total + counts[3]
    np.testing.assert_array_equal(acc.tp, tp)
    np.testing.assert_array_equal(acc.fp, fp)
    np.testing.assert_array_equal(acc.fn, fn)
    assert acc.n_pixels == total
    iou = tp / (tp + fp + fn)
    assert acc.compute()["mIoU"] == pytest.approx(100 * np.nanmean(iou))


def test_matching_survives_save_load_and_must_agree_to_merge(tmp_path) -> None:
    acc = HungarianAccumulator(3, matching="per_image")
    acc.update(np.array([[0, 1]]), np.array([[0, 1]]))
    acc.save(tmp_path / "a.npz")
    assert HungarianAccumulator.load(tmp_path / "a.npz").matching == "per_image"
    with pytest.raises(ValueError, match="matching=per_image"):
        HungarianAccumulator(3).merge(acc)
    with pytest.raises(ValueError, match="per_row"):
        HungarianAccumulator(3, matching="per_batch")


def test_merge_and_load_reject_mismatches(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_classes=3"):
        HungarianAccumulator(5).merge(HungarianAccumulator(3))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        HungarianAccumulator.load(bad)
    with pytest.raises(FileNotFoundError):
        HungarianAccumulator.load(tmp_path / "missing.npz")


def test_bad_inputs_raise_clear_errors() -> None:
    acc = HungarianAccumulator(3)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        acc.update(np.zeros((4, 5), int), np.zeros((5, 4), int))
    with pytest.raises(ValueError, match="minimum -1"):
        acc.update(np.array([[0, -1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="float"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="collides"):
        HungarianAccumulator(3, ignore_index=2)
    acc.update(np.zeros((2, 2), int), np.full((2, 2), IGNORE))
    with pytest.raises(ValueError, match="no labelled pixels"):
        acc.compute()
