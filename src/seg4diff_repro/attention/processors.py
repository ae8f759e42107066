"""Attention processors that observe the joint attention of MM-DiT blocks.

Each processor computes the block output with exactly the operations of the stock diffusers processor
it replaces (so the output is bit-identical) and hands the joint queries, keys and values to an
observer callback, which derives whatever statistics were asked for.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class JointObserver(Protocol):
    """Receives the per-head joint projections of one block call, before the attention itself."""

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_image_tokens: int, scale: float
    ) -> None: ...


def _split_heads(x: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


class ObservedJointAttnProcessor:
    """`JointAttnProcessor2_0` (SD3 / SD3.5 joint attention) with an observer on q, k and v.

    The joint sequence is ``[image tokens ; text tokens]`` as in the stock processor.
    """

    def __init__(self, observer: Callable[..., None]):
        self.observer = observer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = _split_heads(query, batch_size, attn.heads, head_dim)
        key = _split_heads(key, batch_size, attn.heads, head_dim)
        value = _split_heads(value, batch_size, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = _split_heads(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            context_key = _split_heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            context_value = _split_heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        # SDPA's default scale, which the stock processor relies on.
        self.observer(query, key, value, residual.shape[1], head_dim**-0.5)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
