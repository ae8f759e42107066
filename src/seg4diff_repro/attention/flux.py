"""Flux (FLUX.1-dev) joint attention routed through `AttentionHooks`, and the Flux `Backend`.

`HookedFluxAttnProcessor` is diffusers 0.42.1's `FluxAttnProcessor` rewritten op for op with its
attention call sent to ``hooks.attend``. With stock hooks the output is bit-identical: the per-head
tensors are permuted to [B, H, N, D] and back exactly as `dispatch_attention_fn`'s native backend does.

The joint sequence is ``[text tokens ; image tokens]`` (text first). Double-stream blocks get the
image stream as ``hidden_states`` and the text stream as ``encoder_hidden_states``; single-stream
blocks get the already concatenated sequence and no encoder states, so their text-token count comes
from the transformer call: `FluxBackend.token_counts` (run by `HookSwap` in a forward pre-hook)
stores it and the processors read it back.

Layer numbers follow the official code: the 19 double-stream blocks are layers 0…18 and the 38
single-stream blocks layers 19…56 (for smaller models, ``len(transformer_blocks)`` onward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from seg4diff_repro.attention.joint import AttentionHooks, JointLayout

__all__ = ["FluxBackend", "HookedFluxAttnProcessor"]


def _to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] → [B, H, N, D], the permute of diffusers' native attention backend."""
    return x.permute(0, 2, 1, 3)


class HookedFluxAttnProcessor:
    """`FluxAttnProcessor` (Flux double- and single-stream attention) with its attention call routed to hooks.

    ``text_tokens_of_call`` returns the number of text tokens of the current transformer call (or None
    when unknown); it is needed only by single-stream blocks, whose input is the joint sequence.
    """

    # Read by diffusers' `set_attention_backend` / context parallelism; this processor supports neither
    # (the attention call is the hooks'), so they stay None.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, hooks: AttentionHooks, layer: int, text_tokens_of_call: Callable[[], int | None]):
        self.hooks = hooks
        self.layer = layer
        self.text_tokens_of_call = text_tokens_of_call

    def _n_text(self, encoder_hidden_states: torch.Tensor | None, seq_len: int) -> int:
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        n_text = self.text_tokens_of_call()
        if n_text is None:
            raise RuntimeError(
                f"layer {self.layer} is a Flux single-stream block, whose input is the joint [text ; image] "
                "sequence: its text-token count must come from the transformer call. Put the processors on "
                "with `HookSwap` (or `AttentionRecorder`), which reads it with `FluxBackend.token_counts` "
                "in a forward pre-hook."
            )
        if not 0 <= n_text <= seq_len:
            raise RuntimeError(f"layer {self.layer}: {n_text} text tokens recorded, but the sequence has {seq_len}")
        return n_text

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise NotImplementedError(
                "HookedFluxAttnProcessor has no attention-mask support (FluxPipeline passes none); "
                "use the stock FluxAttnProcessor for masked attention."
            )
        # Projections, as diffusers' `_get_qkv_projections` (fused or separate).
        encoder_query = encoder_key = encoder_value = None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                encoder_query, encoder_key, encoder_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                encoder_query = attn.add_q_proj(encoder_hidden_states)
                encoder_key = attn.add_k_proj(encoder_hidden_states)
                encoder_value = attn.add_v_proj(encoder_hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        n_text = self._n_text(encoder_hidden_states, query.shape[1])
        layout = JointLayout(n_image=query.shape[1] - n_text, n_text=n_text, text_first=True)
        hidden_states = self.hooks.attend(
            _to_heads_first(query), _to_heads_first(key), _to_heads_first(value), layout, self.layer
        )
        hidden_states = hidden_states.permute(0, 2, 1, 3)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxBackend:
    """FLUX.1: 19 double-stream blocks (layers 0…18) then 38 single-stream blocks (19…56); text first.

    One instance serves one `HookSwap`: `token_counts` stores the text-token count of the running
    transformer call, which the single-stream processors it made read back.
    """

    name = "flux"

    def __init__(self) -> None:
        self.n_text: int | None = None

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks] + [
            block.attn for block in transformer.single_transformer_blocks
        ]

    def processor(self, hooks: AttentionHooks, layer: int, transformer: nn.Module) -> Any:
        return HookedFluxAttnProcessor(hooks, layer, lambda: self.n_text)

    def token_counts(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(batch, image tokens, text tokens): the packed latents are [B, n_image, C], the T5 states [B, n_text, D]."""
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self.n_text = text.shape[1]
        return latents.shape[0], latents.shape[1], text.shape[1]
