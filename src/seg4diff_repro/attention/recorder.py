"""`AttentionRecorder`: record joint-attention quantities of MM-DiT layers during a forward pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import psutil
import torch
from torch import nn

from seg4diff_repro.attention.backends import backend_for
from seg4diff_repro.attention.fused import fused_head_mean_supported, head_mean_map
from seg4diff_repro.attention.joint import AttentionHooks, JointLayout, attention_with_lse, chunked_lse

RECORDABLE = ("i2t", "t2i", "logits", "value_norms", "qkv")
HeadReduction = Literal["mean"] | None


class RecordingTooLarge(MemoryError):
    """The requested recording would not fit; raised before the forward pass."""


class _LastLayerDone(Exception):
    """Raised by `stop_after_layer` once the last layer a pass needs has attended."""


@contextmanager
def stop_after_layer(transformer: nn.Module, layer: int) -> Iterator[None]:
    """End a transformer call once the joint attention of ``layer`` has run, skipping the blocks after it.

    For a pass that only records maps (extraction): a layer's attention depends on the blocks before it only,
    so what a recorder holds for layers up to ``layer`` is what the full pass records, while the blocks after it
    (half the compute for a middle layer) are skipped. The call's output is lost, and the body ends at the first
    stop: use one context per forward pass.
    """
    module = backend_for(transformer).attention_modules(transformer)[layer]

    def stop(module, args, output):
        raise _LastLayerDone

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _LastLayerDone:
        pass
    finally:
        handle.remove()


class HookSwap:
    """Context manager that puts `hooks` on the joint attention of `layers` and restores the stock processors."""

    def __init__(self, transformer: nn.Module, layers: Iterable[int] | None, hooks: AttentionHooks):
        self.transformer = transformer
        self.backend = backend_for(transformer)
        modules = self.backend.attention_modules(transformer)
        self.layers = list(range(len(modules))) if layers is None else sorted(set(layers))
        bad = [layer for layer in self.layers if not 0 <= layer < len(modules)]
        if bad:
            raise ValueError(f"layers {bad} out of range: this transformer has joint layers 0..{len(modules) - 1}")
        self._modules = {layer: modules[layer] for layer in self.layers}
        self._hooks = hooks
        self._stock: dict[int, object] = {}
        self._pre_hook = None

    def before_forward(self, batch: int, n_image: int, n_text: int) -> None:
        """Called with the token counts of each transformer call, before any block runs."""

    def __enter__(self):
        for layer, module in self._modules.items():
            self._stock[layer] = module.processor
            module.set_processor(self.backend.processor(self._hooks, layer, self.transformer))

        def pre_hook(module, args, kwargs):
            self.before_forward(*self.backend.token_counts(module, args, kwargs))

        self._pre_hook = self.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        for layer, processor in self._stock.items():
            self._modules[layer].set_processor(processor)
        self._stock.clear()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None


class AttentionRecorder(HookSwap, AttentionHooks):
    """Record attention quantities of chosen joint layers; the block outputs stay bit-identical.

    Example::

        from seg4diff_repro.attention import AttentionRecorder
        with AttentionRecorder(transformer, layers=[9], record=("i2t",)) as rec:
            transformer(**inputs)
        rec.i2t[9]  # float32 [batch, heads, n_image_tokens, n_text_tokens]

    What can be recorded, per layer (dicts keyed by layer number):

    - ``i2t``: image queries → text keys; ``t2i``: text queries → image keys. Post-softmax
      probabilities of ONE softmax over ALL joint keys (image and text), then sliced, as in the
      official Seg4Diff code; rows of a slice therefore do not sum to one.
    - ``logits``: the pre-softmax scaled scores q·kᵀ/√d of the same two slices, as
      ``logits_i2t`` and ``logits_t2i``.
    - ``value_norms``: mean L2 norm of the per-head value features [batch, heads] of the image
      tokens, the text tokens and the prompt tokens alone (set ``prompt_mask`` [batch, text]
      first), as ``value_norms[layer]["image" | "text" | "prompt"]``.
    - ``qkv``: image-token query, key and value features [batch, n_image_tokens, heads·head_dim].

    ``heads="mean"`` averages the maps over heads (the axis is kept with size 1); ``None`` keeps
    every head. ``text_tokens`` keeps only the first n text positions (77 for SD3's CLIP tokens).
    Only the requested slices are computed: the row log-sum-exp over all keys comes from the same
    attention kernel as the block output, so the full joint matrix is never formed. Head-mean maps of
    half-precision models on a GPU come from one fused Triton kernel (``fused=False``: torch ops).

    Each forward pass overwrites the previous one's values. A request that would not fit in
    ``max_bytes`` (default: 80% of the free memory of the device) fails before the forward pass.
    The stock processors are restored on exit, also when the body raises.
    """

    def __init__(
        self,
        transformer: nn.Module,
        layers: Iterable[int] | None = None,
        record: Sequence[str] = ("i2t",),
        heads: HeadReduction = None,
        text_tokens: int | None = None,
        max_bytes: int | None = None,
        fused: bool = True,
    ):
        unknown = sorted(set(record) - set(RECORDABLE))
        if unknown:
            raise ValueError(f"record={unknown!r} is not recordable; choose from {RECORDABLE}")
        if heads not in ("mean", None):
            raise ValueError(f'heads={heads!r}: use "mean" (head average) or None (every head)')
        HookSwap.__init__(self, transformer, layers, self)
        self.record = tuple(record)
        self.heads = heads
        self.text_tokens = text_tokens
        self.max_bytes = max_bytes
        self.fused = fused
        self.prompt_mask: torch.Tensor | None = None
        self.i2t: dict[int, torch.Tensor] = {}
        self.t2i: dict[int, torch.Tensor] = {}
        self.logits_i2t: dict[int, torch.Tensor] = {}
        self.logits_t2i: dict[int, torch.Tensor] = {}
        self.value_norms: dict[int, dict[str, torch.Tensor]] = {}
        self.qkv: dict[int, dict[str, torch.Tensor]] = {}

    # -- memory guard -------------------------------------------------------------------------
    def estimate_bytes(self, batch: int, n_image: int, n_text: int) -> int:
        """Bytes the recorded tensors of one forward pass take (float32)."""
        module = next(iter(self._modules.values()))
        heads, head_dim = module.heads, module.inner_dim // module.heads
        kept_heads = 1 if self.heads == "mean" else heads
        n_kept = min(n_text, self.text_tokens or n_text)
        per_map = batch * kept_heads * n_image * n_kept * 4
        maps = sum(name in self.record for name in ("i2t", "t2i")) + 2 * ("logits" in self.record)
        qkv = 3 * batch * n_image * heads * head_dim * 4 if "qkv" in self.record else 0
        return len(self.layers) * (maps * per_map + qkv)

    def before_forward(self, batch: int, n_image: int, n_text: int) -> None:
        needed = self.estimate_bytes(batch, n_image, n_text)
        budget = self.max_bytes if self.max_bytes is not None else self._free_bytes()
        if needed > budget:
            raise RecordingTooLarge(
                f"recording {self.record} for {len(self.layers)} layers (heads={self.heads!r}) at batch {batch}, "
                f"{n_image} image and {n_text} text tokens needs about {needed / 2**30:.2f} GiB, more than the "
                f"{budget / 2**30:.2f} GiB available: record fewer layers, use heads='mean', keep fewer "
                "text_tokens, or lower the batch size"
            )

    def _free_bytes(self) -> int:
        device = next(self.transformer.parameters()).device
        if device.type == "cuda":
            return int(0.8 * torch.cuda.mem_get_info(device)[0])
        return int(0.8 * psutil.virtual_memory().available)

    # -- the attention call -------------------------------------------------------------------
    @torch.no_grad()
    def attend(self, query, key, value, layout: JointLayout, layer: int) -> torch.Tensor:
        needs_lse = "i2t" in self.record or "t2i" in self.record
        if needs_lse:
            out, lse = attention_with_lse(query, key, value)
            if lse is None:
                lse = chunked_lse(query, key, query.shape[-1] ** -0.5)
        else:
            out = AttentionHooks.attend(self, query, key, value, layout, layer)
        image, text = layout.image, self._kept_text(layout)
        scale = query.shape[-1] ** -0.5
        for direction, rows, columns, maps, logits in (
            ("i2t", image, text, self.i2t, self.logits_i2t),
            ("t2i", text, image, self.t2i, self.logits_t2i),
        ):
            if direction not in self.record and "logits" not in self.record:
                continue
            if "logits" not in self.record and self.heads == "mean" and self.fused and fused_head_mean_supported(query):
                maps[layer] = head_mean_map(query, key, lse, rows, columns, scale)
                continue
            scores = query[:, :, rows].float() @ key[:, :, columns].float().transpose(-1, -2) * scale
            if direction in self.record:
                maps[layer] = self._reduce(torch.exp(scores - lse[:, :, rows, None]))
            if "logits" in self.record:
                logits[layer] = self._reduce(scores)
        if "value_norms" in self.record:
            self.value_norms[layer] = self._value_norms(value, layout)
        if "qkv" in self.record:
            self.qkv[layer] = {
                name: tensor[:, :, image].transpose(1, 2).flatten(2).float()
                for name, tensor in (("q", query), ("k", key), ("v", value))
            }
        return out

    def _kept_text(self, layout: JointLayout) -> slice:
        text = layout.text
        if self.text_tokens is None:
            return text
        return slice(text.start, min(text.start + self.text_tokens, text.start + layout.n_text))

    def _value_norms(self, value: torch.Tensor, layout: JointLayout) -> dict[str, torch.Tensor]:
        norms = value.float().norm(dim=-1)  # [B, H, N]
        text = norms[:, :, self._kept_text(layout)]
        result = {"image": norms[:, :, layout.image].mean(-1), "text": text.mean(-1)}
        if self.prompt_mask is not None:
            mask = self.prompt_mask.to(norms.device, torch.float32)[:, None, : text.shape[-1]]
            result["prompt"] = (text * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return result

    def _reduce(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=1, keepdim=True) if self.heads == "mean" else maps
