"""Record joint attention while a stock diffusers pipeline generates an image, at chosen denoising steps.

`StepGatedRecorder` is an `AttentionRecorder` that records only during chosen transformer calls and only
for chosen rows of the batch; every other call runs the stock attention. The stock pipelines make one
transformer call per denoising step: `StableDiffusion3Pipeline` with the batch ``[uncond ; cond]`` under
classifier-free guidance, `FluxPipeline` (guidance-distilled, no true CFG) with the prompt alone. So call i
is step i, and the conditional branch is the second half of an SD3 batch
(docs/method.md#attention-during-generation [assumption]).

Time: "t = k" lies on the schedule by ``step_convention`` (`seg4diff_repro.steps`), recorded in every output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from seg4diff_repro.attention.joint import AttentionHooks, JointLayout
from seg4diff_repro.attention.perturb import BRANCHES, branch_rows
from seg4diff_repro.attention.recorder import AttentionRecorder
from seg4diff_repro.models.common import Noising
from seg4diff_repro.steps import step_index

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from seg4diff_repro.models.flux import FluxAdapter
    from seg4diff_repro.models.sd3 import SD3Adapter

__all__ = [
    "GeneratedRecording",
    "StepGatedRecorder",
    "StepRecording",
    "block_kind",
    "find_token",
    "generate_and_record",
    "prompt_mask",
    "step_index",
    "token_labels",
]

TEXT_TOKENS = 77  # CLIP positions (SD3/SD3.5) or T5 positions (Flux) the maps and norms keep


@dataclass
class StepRecording:
    """What one recorded transformer call left: the recorder's dicts (keyed by layer) for the kept rows."""

    call: int
    timestep: float  # as the transformer received it (Flux: the scheduler's timestep / 1000)
    i2t: dict[int, torch.Tensor]
    t2i: dict[int, torch.Tensor]
    value_norms: dict[int, dict[str, torch.Tensor]]
    qkv: dict[int, dict[str, torch.Tensor]]
    logits_i2t: dict[int, torch.Tensor]
    logits_t2i: dict[int, torch.Tensor]


class StepGatedRecorder(AttentionRecorder):
    """Record only during transformer calls ``calls`` (0-based) and only the batch rows of ``branch``.

    ``branch``: "cond" keeps the second half of a classifier-free-guidance batch ``[uncond ; cond]``,
    "uncond" the first, "all" every row. The block outputs stay the stock ones for the whole batch.
    Each recorded call ends up in ``recordings[call]``. ``value_norms`` gains, beside the per-head
    entries, ``image_all_heads`` / ``text_all_heads`` / ``prompt_all_heads`` [rows]: the mean norm of the
    whole value vector (all heads concatenated), the per-layer metric of docs/method.md#value-norms.
    Other keyword arguments are `AttentionRecorder`'s; ``prompt_mask`` must have the kept rows only.
    """

    def __init__(self, transformer: nn.Module, calls: Iterable[int], branch: str = "cond", **recorder_options):
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r}: choose from {BRANCHES}")
        super().__init__(transformer, **recorder_options)
        self.calls = frozenset(calls)
        self.branch = branch
        self.recordings: dict[int, StepRecording] = {}
        self._call = -1
        self._active = False
        self._timestep = float("nan")
        self._handles: list = []

    def __enter__(self) -> StepGatedRecorder:
        super().__enter__()
        self._call = -1
        # Registered after HookSwap's pre-hook, so `before_forward` has already decided whether this call records.
        self._handles = [
            self.transformer.register_forward_pre_hook(self._read_timestep, with_kwargs=True),
            self.transformer.register_forward_hook(self._keep_recording),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().__exit__(*exc_info)

    def before_forward(self, batch: int, n_image: int, n_text: int) -> None:
        self._call += 1
        self._active = self._call in self.calls
        if self._active:
            rows = branch_rows(self.branch, batch)
            super().before_forward(rows.stop - rows.start, n_image, n_text)

    def _read_timestep(self, module, args, kwargs) -> None:
        if self._active:
            self._timestep = float(kwargs["timestep"].flatten()[0])

    def _keep_recording(self, module, args, output) -> None:
        if not self._active:
            return
        self.recordings[self._call] = StepRecording(
            self._call, self._timestep, self.i2t, self.t2i, self.value_norms, self.qkv, self.logits_i2t,
            self.logits_t2i,
        )
        # Fresh dicts, so that the next recorded call does not overwrite this one's.
        self.i2t, self.t2i, self.value_norms, self.qkv, self.logits_i2t, self.logits_t2i = {}, {}, {}, {}, {}, {}

    @torch.no_grad()
    def attend(self, query, key, value, layout: JointLayout, layer: int) -> torch.Tensor:
        if not self._active:
            return AttentionHooks.attend(self, query, key, value, layout, layer)
        rows = branch_rows(self.branch, query.shape[0])
        if rows == slice(0, query.shape[0]):
            return super().attend(query, key, value, layout, layer)
        # Record the kept rows only; the block output is the stock attention of the whole batch.
        super().attend(query[rows], key[rows], value[rows], layout, layer)
        return AttentionHooks.attend(self, query, key, value, layout, layer)

    def _value_norms(self, value: torch.Tensor, layout: JointLayout) -> dict[str, torch.Tensor]:
        result = super()._value_norms(value, layout)
        norms = value.float().square().sum(dim=(1, 3)).sqrt()  # [B, N]: ‖V_i‖ over all heads
        text = norms[:, self._kept_text(layout)]
        result["image_all_heads"] = norms[:, layout.image].mean(-1)
        result["text_all_heads"] = text.mean(-1)
        if self.prompt_mask is not None:
            mask = self.prompt_mask.to(norms.device, torch.float32)[:, : text.shape[-1]]
            result["prompt_all_heads"] = (text * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return result


def prompt_mask(tokenizer: PreTrainedTokenizerBase, prompt: str, length: int = TEXT_TOKENS) -> torch.Tensor:
    """[1, length] bool: the prompt's own tokens (CLIP: <sos> … <eos>; T5: … </s>), not the padding."""
    encoded = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)
    return torch.tensor(encoded["attention_mask"], dtype=torch.bool)[None]


def token_labels(tokenizer: PreTrainedTokenizerBase, prompt: str, length: int = TEXT_TOKENS) -> list[str]:
    """Display label of each text position: the decoded BPE piece, <sos>, <eos> or <pad>."""
    encoded = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    labels = []
    for piece, real in zip(pieces, encoded["attention_mask"]):
        if not real:
            labels.append("<pad>")
        elif piece == tokenizer.bos_token:
            labels.append("<sos>")
        elif piece == tokenizer.eos_token:
            labels.append("<eos>")
        else:
            labels.append(piece.replace("</w>", "").replace("\u2581", "") or piece)
    return labels


def find_token(labels: Sequence[str], word: str) -> int:
    """Position of ``word``: the first label equal to it, else the first that starts it (a split word)."""
    word = word.lower()
    for matches in (lambda label: label.lower() == word, lambda label: word.startswith(label.lower())):
        for position, label in enumerate(labels):
            if label not in ("<sos>", "<eos>", "<pad>") and label and matches(label):
                return position
    tokens = [label for label in labels if label != "<pad>"]
    raise ValueError(f"{word!r} is not a token of the prompt; its tokens: {tokens}")


def block_kind(transformer: nn.Module, layer: int) -> str:
    """"joint" (SD3 / SD3.5), or Flux's "double" (MM-DiT) or "single" (single-stream) block."""
    if not hasattr(transformer, "single_transformer_blocks"):
        return "joint"
    return "double" if layer < len(transformer.transformer_blocks) else "single"


@dataclass
class GeneratedRecording:
    """One generation: the recordings at each requested k, their schedule positions, and the image."""

    prompt: str
    seed: int
    recordings: dict[int, StepRecording]  # by k
    noising: dict[int, Noising]  # by k
    image: np.ndarray | None  # [H, W, 3] in [0, 1]; None when generation stopped after the last recorded step


@torch.no_grad()
def generate_and_record(
    adapter: SD3Adapter | FluxAdapter,
    prompt: str,
    seed: int,
    timesteps: Sequence[int],
    num_steps: int,
    *,
    cfg: float = 7.5,
    layers: Iterable[int] | None = None,
    record: Sequence[str] = ("i2t",),
    heads: str | None = "mean",
    decode: bool = True,
    step_convention: str = "official",
) -> GeneratedRecording:
    """Generate ``prompt`` with the adapter's stock pipeline, recording the conditional branch at each "t = k".

    SD3 / SD3.5: CFG scale ``cfg`` with the empty negative prompt, 77 zero T5 positions (the official text
    layout), 28 steps in the paper. Flux: one call per step with the adapter's guidance embedding (3.5);
    ``cfg`` does not apply. The starting noise comes from a CPU generator seeded with ``seed``.
    ``decode=False`` stops after the last recorded step and returns no image. ``step_convention`` places
    each "t = k" on the schedule (`seg4diff_repro.steps.step_index`); the recordings are keyed by k.
    """
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    indices = {k: step_index(k, num_steps, step_convention) for k in timesteps}
    if len(set(indices.values())) < len(indices):
        raise ValueError(f"timesteps {list(timesteps)} land on the same step of the {num_steps}-step schedule "
                         f"under step_convention {step_convention!r}: {indices}")
    is_flux = adapter.backbone == "flux"
    branch = "cond" if not is_flux and cfg > 1 else "all"
    last = max(indices.values())

    def stop_after_last(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        if step >= last:
            pipeline._interrupt = True  # the stock loop skips the remaining steps
        return {}

    recorder = StepGatedRecorder(
        adapter.transformer, calls=indices.values(), branch=branch, layers=layers, record=record, heads=heads,
        text_tokens=TEXT_TOKENS,
    )
    recorder.prompt_mask = prompt_mask(adapter.tokenizer, prompt)
    options = {"guidance_scale": adapter.guidance_scale} if is_flux else {"guidance_scale": cfg}
    with recorder:
        output = pipe(
            prompt=prompt,
            num_inference_steps=num_steps,
            height=adapter.image_size,
            width=adapter.image_size,
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=TEXT_TOKENS,
            output_type="np" if decode else "latent",
            callback_on_step_end=None if decode else stop_after_last,
            **options,
        )
    scheduler = pipe.scheduler
    noising = {
        k: Noising(k, num_steps, index, float(scheduler.timesteps[index]), float(scheduler.sigmas[index]))
        for k, index in indices.items()
    }
    return GeneratedRecording(
        prompt=prompt,
        seed=seed,
        recordings={k: recorder.recordings[index] for k, index in indices.items()},
        noising=noising,
        image=np.asarray(output.images[0], dtype=np.float32) if decode else None,
    )

