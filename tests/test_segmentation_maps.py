"""Token maps → class maps → label map, against a float64 restatement of the official code.

Reference (seg4diff_model_ovss.py:164-253, docs/method.md#label-prediction,
docs/method.md#attention-maps-and-normalisation): optional per-token min–max
(x - min) / (max - min + 1e-6); per class the mean of its token columns; optional per-class min–max;
row-major reshape to the token grid; a FULL (num_classes, h, w) tensor that is zero for classes not in
the prompt; torch bilinear upsampling (align_corners=False) to the label size; argmax over classes,
first maximum winning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels


def ref_merge(token_maps, spans, grid, norm_before=False, norm_after=False):
    """[N, T] → [C, h, w] float64, official order of operations; empty spans give NaN (as the official)."""
    a = torch.as_tensor(np.asarray(token_maps), dtype=torch.float64).clone()
    if norm_before:
        a -= a.min(dim=0, keepdim=True)[0]
        a /= a.max(dim=0, keepdim=True)[0] + 1e-6
    merged = torch.zeros(a.shape[0], len(spans), dtype=torch.float64)
    for i, (start, end) in enumerate(spans):
        merged[:, i] = a[:, start:end].mean(dim=-1)
    if norm_after:
        merged -= merged.min(dim=0, keepdim=True)[0]
        merged /= merged.max(dim=0, keepdim=True)[0] + 1e-6
    return merged.T.reshape(len(spans), *grid)


def ref_full_upsampled(class_ids, maps, num_classes, out_shape):
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float64)
    full = torch.zeros(num_classes, *maps.shape[1:], dtype=torch.float64)
    full[torch.as_tensor(np.asarray(class_ids), dtype=torch.long)] = maps
    return F.interpolate(full[None], size=out_shape, mode="bilinear", align_corners=False)[0].numpy()


def ref_labels(class_ids, maps, num_classes, out_shape):
    return np.argmax(ref_full_upsampled(class_ids, maps, num_classes, out_shape), axis=0)  # first max wins


def assert_labels_match(predicted, class_ids, maps, num_classes, out_shape, min_exact=0.999):
    """Equal to the float64 argmax except at float32-level near-ties, where the chosen class must tie."""
    full = ref_full_upsampled(class_ids, maps, num_classes, out_shape)
    expected = np.argmax(full, axis=0)
    assert predicted.shape == tuple(out_shape)
    assert np.issubdtype(predicted.dtype, np.integer)
    chosen = np.take_along_axis(full, predicted[None].astype(np.int64), axis=0)[0]
    best = full.max(axis=0)
    scale = np.abs(full).max()
    assert np.all(best - chosen <= 1e-6 * scale)
    assert np.mean(predicted == expected) >= min_exact
    return expected


def attention_like(rng, n_image, n_text=77, n_keys_extra=154, logits=False):
    """Head-mean I2T rows: softmax over image + text keys (values ~1e-4), or the raw scaled logits."""
    scores = rng.normal(0.0, 1.0, size=(n_image, n_image + n_keys_extra))
    if logits:
        return scores[:, n_image : n_image + n_text]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[:, n_image : n_image + n_text]


# --- class_score_maps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm_before", "norm_after"), [(False, False), (True, False), (False, True), (True, True)])
def test_class_maps_match_official(norm_before, norm_after):
    rng = np.random.default_rng(1)
    grid = (64, 64)
    token_maps = attention_like(rng, grid[0] * grid[1])
    assert token_maps.max() < 0.05  # realistic small attention values: the 1e-6 epsilon matters
    spans = np.array([[1, 2], [2, 5], [5, 7], [7, 8]])
    got = class_score_maps(token_maps.astype(np.float32), spans, grid, norm_before, norm_after)
    ref = ref_merge(token_maps.astype(np.float32), spans, grid, norm_before, norm_after).numpy()
    assert got.shape == (4, 64, 64)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7 if (norm_before or norm_after) else 0)


def test_class_maps_float16_cache_input():
    rng = np.random.default_rng(2)
    token_maps = attention_like(rng, 256).astype(np.float16)
    spans = np.array([[1, 3], [3, 4]])
    got = class_score_maps(token_maps, spans, (16, 16))
    ref = ref_merge(token_maps.astype(np.float64), spans, (16, 16)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_row_major_non_square_grid():
    grid = (3, 5)
    token_maps = np.zeros((15, 77), dtype=np.float32)
    token_maps[:, 4] = np.arange(15)  # token index = 5 * row + col
    token_maps[:, 5] = 100.0
    scores = class_score_maps(token_maps, np.array([[4, 5], [4, 6]]), grid)
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(scores[0], 5 * rows + cols)
    np.testing.assert_allclose(scores[1], (5 * rows + cols + 100.0) / 2)


@pytest.mark.parametrize(("norm_before", "norm_after"), [(False, False), (True, True), (False, True)])
def test_corrected_empty_span_gives_no_nan_and_is_never_predicted(norm_before, norm_after):
    rng = np.random.default_rng(3)
    grid = (8, 8)
    token_maps = attention_like(rng, 64)
    spans = np.array([[1, 3], [3, 76], [76, 76], [76, 76]])  # last two truncated out of the prompt
    class_ids = np.array([1, 4, 6, 7])
    scores = class_score_maps(token_maps, spans, grid, norm_before, norm_after, overflow="corrected")
    assert np.isfinite(scores).all()
    kept_ref = ref_merge(token_maps, spans[:2], grid, norm_before, norm_after).numpy()
    np.testing.assert_allclose(scores[:2], kept_ref, rtol=2e-5, atol=1e-7)
    labels = predict_labels(class_ids, scores, 8, (29, 41))
    assert not np.isin(labels, [6, 7]).any()
    # With positive scores, the kept classes win exactly as if the truncated ones were not in the prompt.
    assert_labels_match(labels, class_ids[:2], kept_ref, 8, (29, 41))


def test_empty_span_with_negative_logits_lets_absent_zero_win():
    rng = np.random.default_rng(4)
    token_maps = -np.abs(attention_like(rng, 64, logits=True)) - 0.5  # every kept score < 0
    spans = np.array([[1, 2], [76, 76]])
    class_ids = np.array([0, 1])
    scores = class_score_maps(token_maps, spans, (8, 8), overflow="corrected")
    labels = predict_labels(class_ids, scores, 3, (16, 16))
    np.testing.assert_array_equal(labels, np.full((16, 16), 2))  # the absent class 2 (zeros), not 1


@pytest.mark.parametrize(("norm_before", "norm_after"), [(False, False), (True, True)])
def test_official_empty_span_is_a_nan_map_that_wins_every_pixel(norm_before, norm_after):
    """Official: the mean of an empty slice is NaN, and torch's argmax of the full tensor picks the first NaN."""
    rng = np.random.default_rng(5)
    token_maps = attention_like(rng, 64)
    spans = np.array([[1, 3], [3, 77], [77, 77], [77, 77]])  # class 4 reaches <eos> (76); 6 and 7 are past it
    class_ids = np.array([1, 4, 6, 7])
    scores = class_score_maps(token_maps, spans, (8, 8), norm_before, norm_after, overflow="official")
    ref = ref_merge(token_maps, spans, (8, 8), norm_before, norm_after)
    np.testing.assert_allclose(scores, ref.numpy(), rtol=2e-5, atol=1e-7)  # NaN where the reference is NaN
    assert np.isnan(scores[2:]).all() and np.isfinite(scores[:2]).all()
    full = torch.zeros(9, 8, 8, dtype=torch.float64)
    full[torch.as_tensor(class_ids)] = ref
    official = F.interpolate(full[None], size=(29, 41), mode="bilinear", align_corners=False)[0].argmax(dim=0)
    labels = predict_labels(class_ids, scores, 9, (29, 41))
    np.testing.assert_array_equal(labels, official.numpy())
    np.testing.assert_array_equal(labels, np.full((29, 41), 6))  # the first class past the window, everywhere


# --- predict_labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_shape", [(64, 64), (37, 53), (480, 353), (20, 131)])
def test_positive_maps_argmax_of_full_tensor(out_shape):
    rng = np.random.default_rng(5)
    grid = (64, 64)
    token_maps = attention_like(rng, 4096)
    class_ids = np.array([0, 3, 4, 11, 15])
    spans = np.array([[1, 2], [2, 4], [4, 5], [5, 8], [8, 9]])
    scores = class_score_maps(token_maps, spans, grid)
    labels = predict_labels(class_ids, scores, 21, out_shape)
    expected = assert_labels_match(labels, class_ids, ref_merge(token_maps, spans, grid).numpy(), 21, out_shape)
    assert set(np.unique(expected)) == set(class_ids.tolist())  # all prompt classes win somewhere
    assert np.isin(labels, class_ids).all()  # positive scores: an absent (zero) class never wins


@pytest.mark.parametrize("out_shape", [(64, 64), (45, 70), (300, 211)])
def test_logit_maps_absent_zero_class_can_win(out_shape):
    rng = np.random.default_rng(6)
    grid = (32, 32)
    token_maps = attention_like(rng, 1024, logits=True)
    class_ids = np.array([2, 5, 9])
    spans = np.array([[1, 2], [2, 4], [4, 5]])
    scores = class_score_maps(token_maps, spans, grid)
    labels = predict_labels(class_ids, scores, 12, out_shape)
    expected = assert_labels_match(labels, class_ids, ref_merge(token_maps, spans, grid).numpy(), 12, out_shape)
    assert (expected == 0).mean() > 0.05  # class 0, the first absent id, wins where all scores are < 0
    assert not np.isin(expected, [1, 3, 4, 6, 7, 8, 10, 11]).any()
    np.testing.assert_array_equal(labels == 0, expected == 0)


def test_logit_maps_when_first_absent_id_is_large():
    rng = np.random.default_rng(7)
    maps = rng.normal(size=(4, 10, 10)).astype(np.float32)
    class_ids = np.array([0, 1, 2, 4])
    labels = predict_labels(class_ids, maps, 6, (23, 17))
    expected = assert_labels_match(labels, class_ids, maps, 6, (23, 17))
    assert (expected == 3).any() and not (expected == 5).any()


def test_vocabulary_prompt_negative_maps_no_absent_class():
    rng = np.random.default_rng(8)
    maps = (rng.normal(size=(5, 12, 12)) - 10).astype(np.float32)  # all negative, every class present
    labels = predict_labels(np.arange(5), maps, 5, (40, 30))
    assert_labels_match(labels, np.arange(5), maps, 5, (40, 30))


def test_exact_ties_lowest_id_wins():
    base = np.random.default_rng(9).random((6, 6)).astype(np.float32) + 0.1
    maps = np.stack([base, base, base * 0.5])
    # Present classes tie exactly: the lower id wins; also when the prompt is not in ascending order.
    for class_ids in (np.array([3, 5, 7]), np.array([5, 3, 7])):
        labels = predict_labels(class_ids, maps, 8, (13, 9))
        np.testing.assert_array_equal(labels, ref_labels(class_ids, maps, 8, (13, 9)))
        np.testing.assert_array_equal(labels, np.full((13, 9), 3))


def test_ties_with_zero_filled_absent_classes():
    zero = np.zeros((5, 5), dtype=np.float32)
    minus = np.full((5, 5), -1.0, dtype=np.float32)
    cases = [
        (np.array([2, 4]), np.stack([zero, minus]), 0),  # present 2 ties absent 0 at zero → 0
        (np.array([0, 3]), np.stack([zero, minus]), 0),  # present 0 ties absent 1 at zero → 0
        (np.array([1, 3]), np.stack([minus, zero]), 0),  # present 3 ties absent 0 → 0
        (np.array([0, 1, 2, 3]), np.stack([minus, minus, zero, minus]), 2),  # 2 ties absent 4 → 2
    ]
    for class_ids, maps, winner in cases:
        labels = predict_labels(class_ids, maps, 5, (11, 7))
        expected = ref_labels(class_ids, maps, 5, (11, 7))
        np.testing.assert_array_equal(expected, np.full((11, 7), winner))
        np.testing.assert_array_equal(labels, expected)


def test_no_class_in_prompt_predicts_class_zero():
    labels = predict_labels(np.array([], dtype=np.int64), np.zeros((0, 64, 64), np.float32), 21, (30, 40))
    np.testing.assert_array_equal(labels, ref_labels(np.array([], dtype=np.int64), np.zeros((0, 64, 64)), 21, (30, 40)))
    assert labels.shape == (30, 40)


def test_upsampling_is_bilinear_half_pixel():
    """A 2×2 map upsampled to 4×4: class 1 wins only where its interpolated value exceeds class 0's constant."""
    maps = np.stack([np.full((2, 2), 0.5), np.array([[0.0, 1.0], [0.0, 1.0]])]).astype(np.float32)
    labels = predict_labels(np.array([0, 1]), maps, 2, (4, 4))
    # align_corners=False columns sample x = 0, 0.25, 0.75, 1 → class-1 values 0, 0.25, 0.75, 1.
    np.testing.assert_array_equal(labels, np.tile([0, 0, 1, 1], (4, 1)))
