"""MAGNET's losses and matcher against hand-computed values, float64 recomputations and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from seg4diff_repro.magnet.losses import (
    DICE_WEIGHT,
    FLOW_MATCHING_WEIGHT,
    FOCAL_WEIGHT,
    dice_loss,
    flow_matching_loss,
    focal_loss,
    mask_losses,
    total_loss,
)
from seg4diff_repro.magnet.matching import (
    class_token_maps,
    classes_in_prompt,
    hungarian_match,
    matching_cost,
)

# One 2×2 mask: logits m and ground truth g, pixel by pixel.
LOGITS = [[2.0, -1.0], [0.5, 0.0]]
GT = [[1.0, 0.0], [0.0, 1.0]]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(m: float, g: float) -> float:
    """Binary cross-entropy of logit m against label g, from its definition."""
    return -(g * math.log(sigmoid(m)) + (1 - g) * math.log(1 - sigmoid(m)))


def tensor(rows: list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- focal and dice, by hand


def test_focal_raw_logit_quirk_by_hand() -> None:
    # Official quirk: p_t = m·g + (1 − m)(1 − g) with the raw logit m.
    # (2, g=1): p_t = 2, (1 − p_t)² = 1, α_t = 0.25     (−1, g=0): p_t = 1 − (−1) = 2, (1 − p_t)² = 1, α_t = 0.75
    # (0.5, g=0): p_t = 0.5, (1 − p_t)² = 0.25, α_t = 0.75   (0, g=1): p_t = 0, (1 − p_t)² = 1, α_t = 0.25
    expected = (
        0.25 * 1 * math.log1p(math.exp(-2.0))
        + 0.75 * 1 * math.log1p(math.exp(-1.0))
        + 0.75 * 0.25 * math.log1p(math.exp(0.5))
        + 0.25 * 1 * math.log(2.0)
    ) / 4
    got = focal_loss(tensor([LOGITS]), tensor([GT]), 1)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1556511, abs=1e-7)
    assert focal_loss(tensor([LOGITS]), tensor([GT]), 1, p_t_from="logit").item() == got.item()


def test_focal_corrected_by_hand_differs_from_quirk() -> None:
    # Published focal: p_t = σ(m) on the mask, 1 − σ(m) = σ(−m) off it.
    expected = (
        0.25 * (1 - sigmoid(2.0)) ** 2 * bce(2.0, 1)
        + 0.75 * (1 - sigmoid(1.0)) ** 2 * bce(-1.0, 0)
        + 0.75 * sigmoid(0.5) ** 2 * bce(0.5, 0)
        + 0.25 * 0.5**2 * bce(0.0, 1)
    ) / 4
    got = focal_loss(tensor([LOGITS]), tensor([GT]), 1, p_t_from="probability")
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.0859562, abs=1e-7)
    quirk = focal_loss(tensor([LOGITS]), tensor([GT]), 1)
    assert abs(quirk.item() - got.item()) > 0.05


def test_focal_sums_over_masks_and_divides_by_num_masks() -> None:
    second_logits, second_gt = [[-0.5, 1.5], [1.0, -2.0]], [[0.0, 1.0], [1.0, 1.0]]

    def one_mask(logits: list, gt: list) -> float:
        terms = []
        for m, g in zip(itertools.chain(*logits), itertools.chain(*gt)):
            p_t = m * g + (1 - m) * (1 - g)
            alpha_t = 0.25 * g + 0.75 * (1 - g)
            terms.append(bce(m, g) * (1 - p_t) ** 2 * alpha_t)
        return sum(terms) / len(terms)

    got = focal_loss(tensor([LOGITS, second_logits]), tensor([GT, second_gt]), 3.0)
    assert got.item() == pytest.approx((one_mask(LOGITS, GT) + one_mask(second_logits, second_gt)) / 3, rel=1e-12)


def test_focal_alpha_below_zero_skips_the_weighting() -> None:
    expected = (bce(2.0, 1) + bce(-1.0, 0) + 0.25 * bce(0.5, 0) + bce(0.0, 1)) / 4
    assert focal_loss(tensor([LOGITS]), tensor([GT]), 1, alpha=-1).item() == pytest.approx(expected, rel=1e-12)


def test_dice_by_hand() -> None:
    probabilities = [sigmoid(2.0), sigmoid(-1.0), sigmoid(0.5), sigmoid(0.0)]
    overlap = probabilities[0] + probabilities[3]  # the two GT pixels
    expected = 1 - (2 * overlap + 1) / (sum(probabilities) + 2 + 1)
    assert expected == pytest.approx(0.2865226, abs=1e-7)
    assert dice_loss(tensor([LOGITS]), tensor([GT]), 1).item() == pytest.approx(expected, rel=1e-12)
    assert dice_loss(tensor([LOGITS, LOGITS]), tensor([GT, GT]), 4).item() == pytest.approx(expected / 2, rel=1e-12)


# ---------------------------------------------------------------- float64 recomputation


def numpy_losses(logits: np.ndarray, targets: np.ndarray, num_masks: float, p_t_from: str) -> tuple[float, float]:
    """Focal and dice in float64 numpy, written from the formulas."""
    m, g = logits.reshape(len(logits), -1), targets.reshape(len(targets), -1)
    sig = 1 / (1 + np.exp(-m))
    ce = g * np.logaddexp(0, -m) + (1 - g) * np.logaddexp(0, m)
    p = m if p_t_from == "logit" else sig
    p_t = p * g + (1 - p) * (1 - g)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * g + 0.75 * (1 - g))).mean(1).sum() / num_masks
    dice = (1 - (2 * (sig * g).sum(1) + 1) / (sig.sum(1) + g.sum(1) + 1)).sum() / num_masks
    return float(focal), float(dice)


@pytest.mark.parametrize("p_t_from", ["logit", "probability"])
def test_losses_match_float64_recomputation(p_t_from: str) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(3, 5, 7))
    targets = (rng.random((3, 5, 7)) < 0.4).astype(np.float64)
    focal_ref, dice_ref = numpy_losses(logits, targets, 2.5, p_t_from)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m, g = torch.tensor(logits, dtype=dtype), torch.tensor(targets, dtype=dtype)
        assert focal_loss(m, g, 2.5, p_t_from=p_t_from).item() == pytest.approx(focal_ref, rel=rel)
        assert dice_loss(m, g, 2.5).item() == pytest.approx(dice_ref, rel=rel)
    half = focal_loss(torch.tensor(logits, dtype=torch.float16), torch.tensor(targets), 2.5, p_t_from=p_t_from)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(focal_ref, rel=1e-2)


def test_losses_have_gradients() -> None:
    logits = tensor([LOGITS]).requires_grad_(True)
    (focal_loss(logits, tensor([GT]), 1) + dice_loss(logits, tensor([GT]), 1)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- upsampling to the GT resolution


def test_mask_losses_upsample_bilinearly_without_corner_alignment() -> None:
    pred = [[1.0, -2.0], [3.0, 0.5]]
    # align_corners=False, 2 → 4: output i samples source (i + 0.5)/2 − 0.5 clamped to [0, 1], so the weights of
    # the two source rows are (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1).
    weights = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]
    upsampled = [
        [sum(weights[i][k] * weights[j][l] * pred[k][l] for k in range(2) for l in range(2)) for j in range(4)]
        for i in range(4)
    ]
    gt = [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    pixels = [(m, float(g)) for m_row, g_row in zip(upsampled, gt) for m, g in zip(m_row, g_row)]
    focal = sum(
        bce(m, g) * (1 - (m * g + (1 - m) * (1 - g))) ** 2 * (0.25 * g + 0.75 * (1 - g)) for m, g in pixels
    ) / 16
    probabilities = [(sigmoid(m), g) for m, g in pixels]
    dice = 1 - (2 * sum(p * g for p, g in probabilities) + 1) / (sum(p + g for p, g in probabilities) + 1)

    got = mask_losses(tensor([pred]), tensor([gt]), 2.0, focal_p_t_from="logit")
    assert set(got) == {"focal", "dice"}
    assert got["focal"].item() == pytest.approx(focal / 2, rel=1e-12)
    assert got["dice"].item() == pytest.approx(dice / 2, rel=1e-12)
    corrected = mask_losses(tensor([pred]), tensor([gt]), 2.0, focal_p_t_from="probability")
    assert corrected["dice"].item() == got["dice"].item()
    assert corrected["focal"].item() != pytest.approx(got["focal"].item(), rel=1e-3)


def test_mask_losses_accept_boolean_masks_at_the_prediction_size() -> None:
    got = mask_losses(tensor([LOGITS]), tensor([GT]).bool(), 1, focal_p_t_from="logit")
    assert got["focal"].item() == pytest.approx(focal_loss(tensor([LOGITS]), tensor([GT]), 1).item(), rel=1e-12)
    assert got["dice"].item() == pytest.approx(0.2865226, abs=1e-7)


# ---------------------------------------------------------------- flow matching and the total


def test_flow_matching_by_hand() -> None:
    v_pred = tensor([[[0.5, -1.0]], [[2.0, 0.0]]])
    noise = tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    latents = tensor([[[0.0, 1.0]], [[-1.0, 0.5]]])
    # target ε − z = [[1, −1], [2, 0.5]]; v − target = [[−0.5, 0], [0, −0.5]]; squares 0.25, 0, 0, 0.25.
    assert flow_matching_loss(v_pred, noise, latents).item() == pytest.approx(0.125, rel=1e-12)
    # The sign of the velocity matters: z − ε would give squares 2.25, 4, 16, 0.25.
    assert flow_matching_loss(-v_pred, latents, noise).item() == pytest.approx(0.125, rel=1e-12)


def test_total_loss_weights() -> None:
    assert (FLOW_MATCHING_WEIGHT, FOCAL_WEIGHT, DICE_WEIGHT) == (1.0, 0.1, 0.2)
    got = total_loss(torch.tensor(1.5), torch.tensor(2.0), torch.tensor(3.0))
    assert got.item() == pytest.approx(1.5 + 0.2 + 0.6, rel=1e-7)


# ---------------------------------------------------------------- Hungarian matching


def nearest_rows(size_in: int, size_out: int) -> list[int]:
    """torch's legacy "nearest": output i reads input floor(i · in/out)."""
    return [min(math.floor(i * size_in / size_out), size_in - 1) for i in range(size_out)]


def bilinear_reference(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with align_corners=False (half-pixel centres, clamped at the border), in numpy."""

    def weights(size_in: int) -> np.ndarray:
        matrix = np.zeros((size, size_in))
        for i in range(size):
            source = max((i + 0.5) * size_in / size - 0.5, 0.0)
            low = min(math.floor(source), size_in - 1)
            high = min(low + 1, size_in - 1)
            matrix[i, low] += 1 - (source - low)
            matrix[i, high] += source - low
        return matrix

    rows, cols = weights(maps.shape[1]), weights(maps.shape[2])
    return np.einsum("ik,nkl,jl->nij", rows, maps, cols)


def reference_cost(
    pred: np.ndarray, gt: np.ndarray, size: int, p_t_from: str, cost_focal: float = 0.02, cost_dice: float = 1.0
) -> np.ndarray:
    """The official matcher's [N, M] cost in float64 numpy, pair by pair."""
    if pred.shape[1:] != (size, size):
        pred = bilinear_reference(pred, size)
    small = gt[:, nearest_rows(gt.shape[1], size)][:, :, nearest_rows(gt.shape[2], size)]
    cost = np.zeros((len(pred), len(gt)))
    for n, m in enumerate(pred.reshape(len(pred), -1)):
        sig = 1 / (1 + np.exp(-m))
        p = m if p_t_from == "logit" else sig
        for k, g in enumerate(small.reshape(len(gt), -1)):
            on = (1 - p) ** 2 * np.logaddexp(0, -m) * 0.25 / m.size
            off = p**2 * np.logaddexp(0, m) * 0.75 / m.size
            focal = (on * g + off * (1 - g)).sum()
            dice = 1 - (2 * (sig * g).sum() + 1) / (sig.sum() + g.sum() + 1)
            cost[n, k] = cost_focal * focal + cost_dice * dice
    return cost


def brute_force(cost: np.ndarray) -> tuple[float, dict[int, int]]:
    """The least total cost over every one-to-one pairing of min(N, M) pairs, and its pairing {gt: pred}."""
    n, m = cost.shape
    best = (math.inf, {})
    if n >= m:
        for preds in itertools.permutations(range(n), m):
            total = sum(cost[p, g] for g, p in enumerate(preds))
            best = min(best, (total, dict(enumerate(preds))), key=lambda x: x[0])
    else:
        for gts in itertools.permutations(range(m), n):
            total = sum(cost[p, g] for p, g in enumerate(gts))
            best = min(best, (total, {g: p for p, g in enumerate(gts)}), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("p_t_from", ["logit", "probability"])
@pytest.mark.parametrize(("n_pred", "n_gt", "pred_size"), [(6, 3, 8), (2, 4, 8), (5, 3, 4)])
def test_hungarian_matches_brute_force(p_t_from: str, n_pred: int, n_gt: int, pred_size: int) -> None:
    rng = np.random.default_rng(n_pred * 10 + n_gt)
    pred = rng.normal(0, 1.5, size=(n_pred, pred_size, pred_size))
    gt = (rng.random((n_gt, 20, 20)) < 0.4).astype(np.float64)  # 20 → 8 is not an integer ratio
    reference = reference_cost(pred, gt, 8, p_t_from)
    cost = matching_cost(torch.tensor(pred), torch.tensor(gt), focal_p_t_from=p_t_from, size=8)
    np.testing.assert_allclose(cost.numpy(), reference, rtol=1e-10)

    pred_indices, gt_indices = hungarian_match(torch.tensor(pred), torch.tensor(gt), focal_p_t_from=p_t_from, size=8)
    assert pred_indices.dtype == gt_indices.dtype == torch.int64
    assert len(pred_indices) == len(gt_indices) == min(n_pred, n_gt)
    best_total, best_pairs = brute_force(reference)
    got_pairs = dict(zip(gt_indices.tolist(), pred_indices.tolist()))
    assert sum(reference[p, g] for g, p in got_pairs.items()) == pytest.approx(best_total, rel=1e-12)
    assert got_pairs == best_pairs


def test_matching_cost_weights_and_the_quirk() -> None:
    rng = np.random.default_rng(3)
    pred, gt = rng.normal(0, 2, size=(4, 8, 8)), (rng.random((2, 8, 8)) < 0.5).astype(np.float64)
    costs = {}
    for p_t_from in ("logit", "probability"):
        costs[p_t_from] = matching_cost(
            torch.tensor(pred), torch.tensor(gt), focal_p_t_from=p_t_from, cost_focal=0.5, cost_dice=2.0, size=8
        ).numpy()
        reference = reference_cost(pred, gt, 8, p_t_from, cost_focal=0.5, cost_dice=2.0)
        np.testing.assert_allclose(costs[p_t_from], reference, rtol=1e-10)
    assert not np.allclose(costs["logit"], costs["probability"], rtol=1e-2)


@pytest.mark.parametrize("p_t_from", ["logit", "probability"])
def test_hungarian_finds_a_planted_perfect_match(p_t_from: str) -> None:
    """At the default 64×64: GT at 128×128, 200 candidates of which four are the masks themselves (±8)."""
    generator = torch.Generator().manual_seed(1)
    gt = torch.zeros(4, 128, 128)
    boxes = [(0, 0, 60, 40), (70, 10, 50, 90), (20, 60, 30, 60), (90, 100, 38, 28)]  # top, left, height, width
    for k, (top, left, height, width) in enumerate(boxes):
        gt[k, top : top + height, left : left + width] = 1
    pred = torch.randn(200, 64, 64, generator=generator) * 2
    planted = [17, 3, 150, 99]
    for k, index in enumerate(planted):
        pred[index] = torch.where(gt[k, ::2, ::2] > 0, 8.0, -8.0)  # 128 → 64 nearest reads the even pixels
    pred_indices, gt_indices = hungarian_match(pred, gt, focal_p_t_from=p_t_from)
    assert dict(zip(gt_indices.tolist(), pred_indices.tolist())) == dict(enumerate(planted))
    assert pred_indices.tolist() == sorted(planted)


def test_hungarian_without_masks_matches_nothing() -> None:
    pred_indices, gt_indices = hungarian_match(torch.randn(5, 64, 64), torch.zeros(0, 128, 128))
    assert pred_indices.numel() == gt_indices.numel() == 0 and pred_indices.dtype == torch.int64


# ---------------------------------------------------------------- COCO identity matching


def test_class_token_maps_average_the_class_tokens_and_share_sub_tokens() -> None:
    token_maps = torch.arange(8, dtype=torch.float64)[:, None, None].expand(8, 2, 3).clone()  # map t is filled with t
    prompt = torch.tensor([49406, 100, 200, 300, 200, 49407])  # 6 ids, 8 maps: the maps past the prompt are unused
    classes = [{100, 200}, [300, 200], [999, 300]]  # id 200 is a sub-token of the first two class names
    maps = class_token_maps(token_maps, prompt, classes)
    assert maps.shape == (3, 2, 3)
    assert torch.allclose(maps[0], torch.full((2, 3), (1 + 2 + 4) / 3, dtype=torch.float64))
    assert torch.allclose(maps[1], torch.full((2, 3), (2 + 3 + 4) / 3, dtype=torch.float64))
    assert torch.allclose(maps[2], torch.full((2, 3), 3.0, dtype=torch.float64))


def test_classes_in_prompt_and_the_missing_class_error() -> None:
    prompt = torch.tensor([49406, 100, 200, 49407])
    classes = [[100], [555, 556], [200, 556]]
    assert classes_in_prompt(prompt, classes) == [0, 2]
    missing = r"class 1 \(BPE ids \[555, 556\]\) has no token in the prompt.*classes_in_prompt"
    with pytest.raises(ValueError, match=missing):
        class_token_maps(torch.zeros(77, 4, 4), prompt, classes)
    kept = [classes[i] for i in classes_in_prompt(prompt, classes)]
    assert class_token_maps(torch.zeros(77, 4, 4), prompt, kept).shape == (2, 4, 4)


# ---------------------------------------------------------------- errors


def test_errors_name_the_bad_value() -> None:
    m, g = tensor([LOGITS]), tensor([GT])
    with pytest.raises(ValueError, match=r"p_t_from must be 'logit'.*or 'probability'.*got 'sigmoid'"):
        focal_loss(m, g, 1, p_t_from="sigmoid")
    with pytest.raises(ValueError, match=r"focal_p_t_from must be.*got 'prob'"):
        mask_losses(m, g, 1, focal_p_t_from="prob")
    with pytest.raises(ValueError, match=r"p_t_from must be.*got 'raw'"):
        hungarian_match(torch.randn(3, 8, 8), torch.ones(2, 8, 8), focal_p_t_from="raw", size=8)
    with pytest.raises(ValueError, match=r"num_masks must be a positive number.*got 0"):
        dice_loss(m, g, 0)
    with pytest.raises(ValueError, match=r"same shape"):
        focal_loss(m, torch.zeros(1, 4, 4), 1)
    with pytest.raises(ValueError, match=r"same M \(matched pairs\), got \(1, 2, 2\) and \(2, 4, 4\)"):
        mask_losses(m, torch.zeros(2, 4, 4), 1, focal_p_t_from="logit")
    with pytest.raises(ValueError, match=r"v_pred \(2, 3\), noise \(2, 3\) and latents \(2, 4\)"):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
    bad = torch.randn(3, 8, 8)
    bad[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite.*non-finite entries: 1"):
        hungarian_match(bad, torch.ones(2, 8, 8), size=8)
    with pytest.raises(ValueError, match=r"L <= T, got \(4, 2, 2\) and \(5,\)"):
        class_token_maps(torch.zeros(4, 2, 2), torch.arange(5), [[1]])
    with pytest.raises(ValueError, match=r"class 1 has no BPE token ids"):
        class_token_maps(torch.zeros(4, 2, 2), torch.arange(4), [[1], []])
