"""Pairing MAGNET's attention maps with ground-truth masks (docs/method.md#magnet).

SA-1B: Hungarian matching of the candidate maps (24 heads × 77 tokens) to the masks, with the official matcher's
cost 0.02·focal + 1.0·dice at 64×64. COCO: identity matching, each class present paired with the mean of the
prompt's token maps whose BPE id belongs to the class name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .losses import FOCAL_ALPHA, FOCAL_GAMMA, PTFrom, focal_p_t_input, scoring_dtype


def _check_maps(pred_logits: torch.Tensor, gt_masks: torch.Tensor) -> None:
    if pred_logits.ndim != 3 or gt_masks.ndim != 3:
        raise ValueError(
            f"pred_logits must be [N, h, w] and gt_masks [M, H, W], got {tuple(pred_logits.shape)} and "
            f"{tuple(gt_masks.shape)}"
        )


@torch.no_grad()
def matching_cost(
    pred_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    focal_p_t_from: PTFrom = "logit",
    cost_focal: float = 0.02,
    cost_dice: float = 1.0,
    size: int = 64,
) -> torch.Tensor:
    """The [N, M] cost of pairing each of ``pred_logits`` [N, h, w] with each of ``gt_masks`` [M, H, W].

    As the official matcher: masks nearest-downsampled (``mode="nearest"``) to size×size, the batched focal cost
    Σ_pixels (1 − p)^γ·BCE(m, 1)·α/HW on the mask and p^γ·BCE(m, 0)·(1 − α)/HW off it (p the raw logit by default,
    the official quirk, or sigmoid(m)), the batched dice cost on sigmoid(m) with +1 smoothing; float32 at least.
    The official maps are already 64×64; maps of another size are first resized bilinearly (align_corners=False).
    """
    _check_maps(pred_logits, gt_masks)
    dtype = scoring_dtype(pred_logits)
    logits = pred_logits.to(dtype)
    if logits.shape[-2:] != (size, size):
        logits = F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    targets = F.interpolate(gt_masks[:, None].to(dtype), size=(size, size), mode="nearest")[:, 0]
    logits, targets = logits.flatten(1), targets.flatten(1)
    pixels = logits.shape[1]

    probability = focal_p_t_input(logits, focal_p_t_from)
    # BCE-with-logits against an all-ones / all-zeros target is softplus(−m) / softplus(m).
    focal_on = (1 - probability) ** FOCAL_GAMMA * F.softplus(-logits) * (FOCAL_ALPHA / pixels)
    focal_off = probability**FOCAL_GAMMA * F.softplus(logits) * ((1 - FOCAL_ALPHA) / pixels)
    focal = focal_on @ targets.T + focal_off @ (1 - targets).T

    sigmoid = logits.sigmoid()
    overlap = 2 * sigmoid @ targets.T
    total = sigmoid.sum(-1)[:, None] + targets.sum(-1)[None, :]
    dice = 1 - (overlap + 1) / (total + 1)
    return cost_focal * focal + cost_dice * dice


@torch.no_grad()
def hungarian_match(
    pred_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    focal_p_t_from: PTFrom = "logit",
    cost_focal: float = 0.02,
    cost_dice: float = 1.0,
    size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred_indices, gt_indices): the min(N, M) pairs of least total ``matching_cost`` (scipy's
    linear_sum_assignment, pred_indices ascending), as int64 tensors on ``pred_logits``' device; unmatched
    predictions get no loss. No masks: two empty tensors."""
    _check_maps(pred_logits, gt_masks)
    device = pred_logits.device
    if gt_masks.shape[0] == 0 or pred_logits.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    cost = matching_cost(
        pred_logits, gt_masks, focal_p_t_from=focal_p_t_from, cost_focal=cost_focal, cost_dice=cost_dice, size=size
    )
    if not torch.isfinite(cost).all():
        raise ValueError(
            "the matching cost has NaN or infinite entries: pred_logits must be finite "
            f"(non-finite entries: {int((~torch.isfinite(pred_logits)).sum())}); check the attention logits"
        )
    pred_indices, gt_indices = linear_sum_assignment(cost.cpu().numpy())
    return (
        torch.as_tensor(pred_indices, dtype=torch.int64, device=device),
        torch.as_tensor(gt_indices, dtype=torch.int64, device=device),
    )


def _class_id_tensors(class_token_ids: Sequence[Iterable[int]], device: torch.device) -> list[torch.Tensor]:
    ids = []
    for index, token_ids in enumerate(class_token_ids):
        as_tensor = torch.tensor(sorted({int(i) for i in token_ids}), dtype=torch.int64, device=device)
        if as_tensor.numel() == 0:
            raise ValueError(f"class {index} has no BPE token ids; tokenize its name without <bos>/<eos>")
        ids.append(as_tensor)
    return ids


def classes_in_prompt(prompt_token_ids: torch.Tensor, class_token_ids: Sequence[Iterable[int]]) -> list[int]:
    """Indices of the classes with at least one BPE id among ``prompt_token_ids``: the official COCO step keeps
    only these (a class whose tokens fell past the 77-token truncation is dropped with its mask)."""
    prompt = torch.as_tensor(prompt_token_ids).long()
    return [
        index
        for index, ids in enumerate(_class_id_tensors(class_token_ids, prompt.device))
        if torch.isin(prompt, ids).any()
    ]


def class_token_maps(
    token_maps: torch.Tensor, prompt_token_ids: torch.Tensor, class_token_ids: Sequence[Iterable[int]]
) -> torch.Tensor:
    """[C, h, w]: for each class, the mean of the ``token_maps`` [T, h, w] at the prompt positions whose id is in
    the class name's BPE id set (``torch.isin``, so a sub-token two class names share feeds both); the COCO
    identity matching (docs/method.md#magnet). ``prompt_token_ids`` [L ≤ T] are the prompt's ids in map order.
    Drop classes without a token in the prompt first (``classes_in_prompt``), as the official code does.
    """
    prompt = torch.as_tensor(prompt_token_ids).long().to(token_maps.device)
    if token_maps.ndim != 3 or prompt.ndim != 1 or prompt.shape[0] > token_maps.shape[0]:
        raise ValueError(
            f"token_maps must be [T, h, w] and prompt_token_ids [L] with L <= T, got {tuple(token_maps.shape)} "
            f"and {tuple(prompt.shape)}"
        )
    if len(class_token_ids) == 0:
        raise ValueError("class_token_ids is empty: no class to build a map for")
    maps = []
    for index, ids in enumerate(_class_id_tensors(class_token_ids, prompt.device)):
        positions = torch.isin(prompt, ids).nonzero().squeeze(-1)
        if positions.numel() == 0:
            raise ValueError(
                f"class {index} (BPE ids {ids.tolist()}) has no token in the prompt; drop it (and its mask) before "
                "matching, e.g. with classes_in_prompt, as the official training does"
            )
        maps.append(token_maps[positions].mean(dim=0))
    return torch.stack(maps)
