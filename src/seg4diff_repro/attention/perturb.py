"""I2T attention perturbation (appendix A.3): blur the post-softmax image→text block along the text keys.

Only the image-query × text-key block changes; the image→image, text→image and text→text
probabilities stay as they are. Since the block output of an image query is Σ_j P_ij v_j, the
perturbed output is the stock one plus (blur(P_it) − P_it)·V_text, so only the I2T slice is formed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from seg4diff_repro.attention.joint import AttentionHooks, JointLayout, attention_with_lse, chunked_lse
from seg4diff_repro.attention.recorder import HookSwap

# Which rows of a classifier-free-guidance batch [uncond ; cond] a perturbation applies to.
BRANCHES = ("all", "uncond", "cond")


def branch_rows(branch: str, batch: int) -> slice:
    """Batch rows of a classifier-free-guidance branch: the batch is [uncond; cond], as diffusers stacks it."""
    if branch == "uncond":
        return slice(0, batch // 2)
    if branch == "cond":
        return slice(batch // 2, batch)
    return slice(0, batch)


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian weights; σ = 9, size 5 gives [0.19754, 0.20123, 0.20247, 0.20123, 0.19754]."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size {size}: use an odd size ≥ 1")
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def blur_text_axis(probabilities: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve the last axis with ``kernel`` under reflect padding (the paper's choice)."""
    if kernel.numel() == 1:
        return probabilities * kernel.to(probabilities)
    shape = probabilities.shape
    rows = probabilities.reshape(-1, 1, shape[-1])
    padded = F.pad(rows, (kernel.numel() // 2, kernel.numel() // 2), mode="reflect")
    return F.conv1d(padded, kernel.to(rows).view(1, 1, -1)).reshape(shape)


class I2TPerturbation(HookSwap, AttentionHooks):
    """Blur the I2T attention of ``layers`` while the context is active.

    ``branch`` picks the rows of a classifier-free-guidance batch [uncond ; cond] to perturb
    ("all", "uncond" or "cond"). ``text_tokens`` limits the blurred text keys to the first n
    (default: every text key of the joint sequence, the recorded assumption of docs/method.md#perturbation).
    """

    def __init__(
        self,
        transformer: nn.Module,
        layers: Iterable[int],
        sigma: float = 9.0,
        kernel_size: int = 5,
        branch: str = "all",
        text_tokens: int | None = None,
    ):
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r}: choose from {BRANCHES}")
        HookSwap.__init__(self, transformer, layers, self)
        self.kernel = gaussian_kernel(sigma, kernel_size)
        self.branch = branch
        self.text_tokens = text_tokens

    @torch.no_grad()
    def attend(self, query, key, value, layout: JointLayout, layer: int) -> torch.Tensor:
        out, lse = attention_with_lse(query, key, value)
        scale = query.shape[-1] ** -0.5
        rows = branch_rows(self.branch, query.shape[0])
        image = layout.image
        text = layout.text
        if self.text_tokens is not None:
            text = slice(text.start, min(text.start + self.text_tokens, text.start + layout.n_text))
        q_image = query[rows, :, image].float()
        if lse is None:
            lse = chunked_lse(query, key, scale)
        probabilities = torch.exp(
            q_image @ key[rows, :, text].float().transpose(-1, -2) * scale - lse[rows, :, image, None]
        )
        change = (blur_text_axis(probabilities, self.kernel) - probabilities) @ value[rows, :, text].float()
        out = out.clone()
        out[rows, :, image] = (out[rows, :, image].float() + change).to(out.dtype)
        return out
