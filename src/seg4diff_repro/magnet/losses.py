"""MAGNET's training losses: flow matching plus focal and dice mask losses (docs/method.md#magnet).

The mask losses follow the official MaskFormer-style criterion: a matched prediction (a pre-softmax I2T logit
map) is bilinearly upsampled to its ground-truth mask's resolution, then scored with a sigmoid focal loss
(α 0.25, γ 2) and a dice loss with +1 smoothing, each summed over masks and divided by ``num_masks``. The official
focal loss computes p_t from the raw logit instead of its sigmoid (the probability is overwritten by the logit);
``p_t_from="logit"`` reproduces that and is the default, ``"probability"`` is the focal loss as published.
Half-precision inputs are scored in float32 (the official code runs these ops in float32 under autocast too).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

FLOW_MATCHING_WEIGHT = 1.0
FOCAL_WEIGHT = 0.1
DICE_WEIGHT = 0.2
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2

PTFrom = Literal["logit", "probability"]
P_T_SOURCES: tuple[str, ...] = ("logit", "probability")


def check_p_t_from(p_t_from: str, name: str = "p_t_from") -> None:
    """Raise unless ``p_t_from`` names where the focal p_t comes from."""
    if p_t_from not in P_T_SOURCES:
        raise ValueError(
            f"{name} must be 'logit' (the official code: p_t from the raw logit) or 'probability' "
            f"(the published focal loss: p_t from sigmoid(logit)), got {p_t_from!r}"
        )


def focal_p_t_input(logits: torch.Tensor, p_t_from: str) -> torch.Tensor:
    """What the focal loss treats as the foreground probability: the logit itself (official) or its sigmoid."""
    check_p_t_from(p_t_from)
    return logits if p_t_from == "logit" else logits.sigmoid()


def scoring_dtype(tensor: torch.Tensor) -> torch.dtype:
    """``tensor``'s floating dtype, at least float32."""
    return torch.promote_types(tensor.dtype, torch.float32)


def check_num_masks(num_masks: float) -> float:
    """``num_masks`` as a positive finite float, or a ValueError saying what it must be."""
    value = float(num_masks)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"num_masks must be a positive number (the official criterion clamps it to at least 1), got {num_masks!r}"
        )
    return value


def _flattened_pair(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` and ``targets`` as [masks, pixels] in a common float dtype (at least float32)."""
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape; "
            "upsample the predictions to the masks first (mask_losses does)"
        )
    if logits.ndim < 2:
        raise ValueError(f"logits must be [masks, ...] with at least 2 dimensions, got shape {tuple(logits.shape)}")
    dtype = scoring_dtype(logits)
    return logits.to(dtype).flatten(1), targets.to(dtype).flatten(1)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    *,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    p_t_from: PTFrom = "logit",
) -> torch.Tensor:
    """Sigmoid focal loss BCE(m, g)·(1 − p_t)^γ·α_t of [masks, ...] logits against binary targets, averaged over
    pixels, summed over masks and divided by ``num_masks`` (docs/method.md#magnet).

    p_t = p·g + (1 − p)(1 − g) with p the raw logit (``p_t_from="logit"``, the official code) or sigmoid(logit)
    (``"probability"``); α_t = α·g + (1 − α)(1 − g), skipped when α < 0 as in the official code.
    """
    divisor = check_num_masks(num_masks)
    logits, targets = _flattened_pair(logits, targets)
    probability = focal_p_t_input(logits, p_t_from)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / divisor


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss 1 − (2Σpg + 1)/(Σp + Σg + 1) per mask on p = sigmoid(logits), summed over masks and divided by
    ``num_masks`` (docs/method.md#magnet)."""
    divisor = check_num_masks(num_masks)
    logits, targets = _flattened_pair(logits, targets)
    probability = logits.sigmoid()
    overlap = 2 * (probability * targets).sum(-1)
    total = probability.sum(-1) + targets.sum(-1)
    return (1 - (overlap + 1) / (total + 1)).sum() / divisor


def mask_losses(
    pred_logits: torch.Tensor, gt_masks: torch.Tensor, num_masks: float, *, focal_p_t_from: PTFrom
) -> dict[str, torch.Tensor]:
    """Focal and dice losses of matched pairs: ``pred_logits`` [M, h, w] (the i-th paired with the i-th of
    ``gt_masks`` [M, H, W]) upsampled bilinearly (align_corners=False) to H×W first, as the official criterion
    does (docs/method.md#magnet). Unweighted: scale with FOCAL_WEIGHT and DICE_WEIGHT (``total_loss``).

    ``num_masks``: the official divisor, the number of ground-truth masks (Hungarian matching: over the batch and
    GPUs, clamped to at least 1) or of matched classes (identity matching).
    """
    check_p_t_from(focal_p_t_from, "focal_p_t_from")
    if pred_logits.ndim != 3 or gt_masks.ndim != 3 or pred_logits.shape[0] != gt_masks.shape[0]:
        raise ValueError(
            f"pred_logits must be [M, h, w] and gt_masks [M, H, W] with the same M (matched pairs), "
            f"got {tuple(pred_logits.shape)} and {tuple(gt_masks.shape)}"
        )
    upsampled = F.interpolate(
        pred_logits[:, None].to(scoring_dtype(pred_logits)), size=gt_masks.shape[-2:], mode="bilinear",
        align_corners=False,
    )[:, 0]
    return {
        "focal": focal_loss(upsampled, gt_masks, num_masks, p_t_from=focal_p_t_from),
        "dice": dice_loss(upsampled, gt_masks, num_masks),
    }


def flow_matching_loss(v_pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Unweighted flow-matching loss: the mean over samples of mean‖v_pred − (ε − z)‖² with ε ``noise`` and z the
    clean ``latents`` (docs/method.md#magnet)."""
    if not v_pred.shape == noise.shape == latents.shape:
        raise ValueError(
            f"v_pred {tuple(v_pred.shape)}, noise {tuple(noise.shape)} and latents {tuple(latents.shape)} must "
            "have the same shape [batch, ...]"
        )
    dtype = scoring_dtype(v_pred)
    velocity = noise.to(dtype) - latents.to(dtype)
    squared_error = (v_pred.to(dtype) - velocity) ** 2
    return squared_error.reshape(squared_error.shape[0], -1).mean(1).mean()


def total_loss(flow_matching: torch.Tensor, focal: torch.Tensor, dice: torch.Tensor) -> torch.Tensor:
    """MAGNET's objective: FLOW_MATCHING_WEIGHT·L_FM + FOCAL_WEIGHT·L_focal + DICE_WEIGHT·L_dice
    (1, 0.1, 0.2; docs/method.md#magnet)."""
    return FLOW_MATCHING_WEIGHT * flow_matching + FOCAL_WEIGHT * focal + DICE_WEIGHT * dice
