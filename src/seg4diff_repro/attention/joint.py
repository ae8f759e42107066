"""The joint (image + text) attention call that every processor routes through.

Processors hand `AttentionHooks.attend` the per-head joint queries, keys and values ([B, H, N, D],
after QK norm and RoPE) with a `JointLayout` saying where the image and text tokens are. The default
hook is the stock attention; recorders and perturbations override it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend


@dataclass(frozen=True)
class JointLayout:
    """Token layout of a joint sequence: SD3 puts the image first, Flux the text first."""

    n_image: int
    n_text: int
    text_first: bool

    @property
    def image(self) -> slice:
        return slice(self.n_text, None) if self.text_first else slice(0, self.n_image)

    @property
    def text(self) -> slice:
        return slice(0, self.n_text) if self.text_first else slice(self.n_image, None)


class AttentionHooks:
    """What a processor does at the attention call; the base class is the stock attention."""

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: JointLayout, layer: int
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stock SDPA output plus the row log-sum-exp of the scaled scores, from the same kernel.

    The kernel is the one `F.scaled_dot_product_attention` would pick for these inputs, so the output
    is bit-identical to the stock call. Returns ``lse = None`` when SDPA would use its math fallback,
    which exposes no log-sum-exp; the caller then computes it itself.
    """
    choice = SDPBackend(torch._fused_sdp_choice(query, key, value))
    n_queries = query.shape[2]
    if query.device.type == "cpu" and choice == SDPBackend.FLASH_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
    elif choice == SDPBackend.FLASH_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value)[:2]
    elif choice == SDPBackend.EFFICIENT_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)[:2]
    elif choice == SDPBackend.CUDNN_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True)[:2]
    else:
        return F.scaled_dot_product_attention(query, key, value), None
    # The fused kernels pad or add a trailing axis to the statistics; keep [B, H, N].
    return out, lse.reshape(*lse.shape[:2], -1)[..., :n_queries].float()


def chunked_lse(query: torch.Tensor, key: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Row log-sum-exp of scale·q kᵀ in float32, a chunk of queries at a time."""
    key = key.float()
    return torch.cat(
        [
            torch.logsumexp(query[:, :, start : start + chunk].float() @ key.transpose(-1, -2) * scale, dim=-1)
            for start in range(0, query.shape[2], chunk)
        ],
        dim=2,
    )
