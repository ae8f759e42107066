"""`I2TLogitsTap`: the pre-softmax image→text scores of one joint layer, kept in the autograd graph for training."""

from __future__ import annotations

import torch
from torch import nn

from seg4diff_repro.attention.joint import AttentionHooks, JointLayout
from seg4diff_repro.attention.recorder import HookSwap


class I2TLogitsTap(HookSwap, AttentionHooks):
    """During a forward pass, keep q·kᵀ/√d of the image queries against the first ``text_tokens`` text keys of
    ``layer``, [batch, heads, n_image, text_tokens], with gradients (MAGNET's mask candidates: the official
    trainer's ``SOFTMAX: False`` capture). The block output is the stock attention."""

    def __init__(self, transformer: nn.Module, layer: int, text_tokens: int):
        HookSwap.__init__(self, transformer, [layer], self)
        self.text_tokens = text_tokens
        self.logits: torch.Tensor | None = None

    def attend(self, query, key, value, layout: JointLayout, layer: int) -> torch.Tensor:
        text = slice(layout.text.start, layout.text.start + min(self.text_tokens, layout.n_text))
        scale = query.shape[-1] ** -0.5
        self.logits = (query[:, :, layout.image] @ key[:, :, text].transpose(-1, -2)).float() * scale
        return AttentionHooks.attend(self, query, key, value, layout, layer)
