"""Attention processors that route the joint attention of SD3 / SD3.5 blocks through `AttentionHooks`.

The processor computes everything around the attention call with exactly the operations of the stock
diffusers processor it replaces; with hooks that return the stock attention, the block output is
bit-identical.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from seg4diff_repro.attention.joint import AttentionHooks, JointLayout


def _split_heads(x: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


class HookedJointAttnProcessor:
    """`JointAttnProcessor2_0` (SD3 / SD3.5 joint attention) with its attention call routed to hooks.

    The joint sequence is ``[image tokens ; text tokens]`` as in the stock processor.
    """

    def __init__(self, hooks: AttentionHooks, layer: int):
        self.hooks = hooks
        self.layer = layer

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

        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        layout = JointLayout(n_image=residual.shape[1], n_text=n_text, text_first=False)
        hidden_states = self.hooks.attend(query, key, value, layout, self.layer)
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
