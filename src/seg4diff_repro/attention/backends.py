"""Per-backbone knowledge the attention tools need: where the joint attentions are and how tokens are laid out."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Protocol

from torch import nn

from seg4diff_repro.attention.joint import AttentionHooks


class Backend(Protocol):
    """How to find, hook and size the joint attention of one transformer family."""

    name: str

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """The joint attention modules, indexed by the paper's layer numbers."""

    def processor(self, hooks: AttentionHooks, layer: int, transformer: nn.Module) -> Any:
        """A processor for `layer` that routes the attention call through `hooks`."""

    def token_counts(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(batch, image tokens, text tokens) of a transformer call, read before it runs."""


class SD3Backend:
    """SD3-medium and SD3.5-medium: joint blocks in `transformer_blocks`, image tokens first.

    SD3.5's image-only `attn2` is not joint attention and is left alone.
    """

    name = "sd3"

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn for block in transformer.transformer_blocks]

    def processor(self, hooks: AttentionHooks, layer: int, transformer: nn.Module) -> Any:
        from seg4diff_repro.attention.processors import HookedJointAttnProcessor

        return HookedJointAttnProcessor(hooks, layer)

    def token_counts(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        patch = transformer.config.patch_size
        return latents.shape[0], (latents.shape[-2] // patch) * (latents.shape[-1] // patch), text.shape[1]


# Backends by transformer class name; Flux's lives in its own module (imported when first needed).
BACKENDS = {
    "SD3Transformer2DModel": lambda: SD3Backend(),
    "FluxTransformer2DModel": lambda: import_module("seg4diff_repro.attention.flux").FluxBackend(),
}


def backend_for(transformer: nn.Module) -> Backend:
    factory = BACKENDS.get(type(transformer).__name__)
    if factory is None:
        raise TypeError(
            f"{type(transformer).__name__} is not a supported MM-DiT transformer; supported: {sorted(BACKENDS)}"
        )
    return factory()
