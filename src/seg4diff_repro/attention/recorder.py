"""`AttentionRecorder`: record joint-attention maps of MM-DiT blocks during a forward pass."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from seg4diff_repro.attention.processors import ObservedJointAttnProcessor

RECORDABLE = ("i2t", "t2i")
HeadReduction = Literal["mean"] | None


def joint_blocks(transformer: nn.Module) -> nn.ModuleList:
    """The MM-DiT (joint image-text) blocks of a diffusers transformer."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(
            f"{type(transformer).__name__} has no `transformer_blocks`; AttentionRecorder supports "
            "diffusers MM-DiT transformers such as SD3Transformer2DModel."
        )
    return blocks


class AttentionRecorder:
    """Record post-softmax joint attention of chosen MM-DiT layers.

    Example::

        from seg4diff_repro.attention import AttentionRecorder
        with AttentionRecorder(transformer, layers=[9], record=("i2t",)) as rec:
            transformer(**inputs)
        rec.i2t[9]  # float32 [batch, heads, n_image_tokens, n_text_tokens]

    ``i2t[l]`` holds the attention of image queries to text keys and ``t2i[l]`` that of text queries
    to image keys. Both are probabilities of one softmax taken over ALL joint keys (image and text),
    then sliced, as in the official Seg4Diff code; rows therefore do not sum to one. With
    ``heads="mean"`` the head axis is averaged (kept with size 1). Each forward pass overwrites the
    maps of the previous one. The stock processors are restored on exit, also when the body raises.

    ``query_chunk`` bounds memory: scores are computed for that many queries at a time.
    """

    def __init__(
        self,
        transformer: nn.Module,
        layers: Iterable[int] | None = None,
        record: Sequence[str] = ("i2t",),
        heads: HeadReduction = None,
        query_chunk: int = 1024,
    ):
        blocks = joint_blocks(transformer)
        self.layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
        bad = [layer for layer in self.layers if not 0 <= layer < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: this transformer has joint layers 0..{len(blocks) - 1}")
        unknown = sorted(set(record) - set(RECORDABLE))
        if unknown:
            raise ValueError(f"record={unknown!r} is not recordable; choose from {RECORDABLE}")
        if heads not in ("mean", None):
            raise ValueError(f'heads={heads!r}: use "mean" (head average) or None (every head)')
        self.record = tuple(record)
        self.heads = heads
        self.query_chunk = query_chunk
        self._attns = {layer: blocks[layer].attn for layer in self.layers}
        self._stock: dict[int, object] = {}
        self.i2t: dict[int, torch.Tensor] = {}
        self.t2i: dict[int, torch.Tensor] = {}

    def __enter__(self) -> AttentionRecorder:
        for layer, attn in self._attns.items():
            self._stock[layer] = attn.processor
            attn.set_processor(ObservedJointAttnProcessor(self._observer_for(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for layer, processor in self._stock.items():
            self._attns[layer].set_processor(processor)
        self._stock.clear()

    def _observer_for(self, layer: int):
        def observe(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_image: int, scale: float):
            if "i2t" in self.record:
                self.i2t[layer] = self._reduce(
                    self._softmax_slice(query[:, :, :n_image], key, scale, slice(n_image, None))
                )
            if "t2i" in self.record:
                self.t2i[layer] = self._reduce(
                    self._softmax_slice(query[:, :, n_image:], key, scale, slice(0, n_image))
                )

        return observe

    @torch.no_grad()
    def _softmax_slice(self, query: torch.Tensor, key: torch.Tensor, scale: float, keys: slice) -> torch.Tensor:
        """softmax(q kᵀ · scale) over all keys, in float32, keeping only the ``keys`` columns."""
        key = key.float()
        chunks = []
        for start in range(0, query.shape[2], self.query_chunk):
            scores = query[:, :, start : start + self.query_chunk].float() @ key.transpose(-1, -2)
            chunks.append(torch.softmax(scores * scale, dim=-1)[..., keys])
        return torch.cat(chunks, dim=2)

    def _reduce(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=1, keepdim=True) if self.heads == "mean" else maps
