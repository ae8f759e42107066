"""Train the toy world's tiny SD3-architecture pipeline on a prepared toy set's train images, labels and captions.

The recipe (every choice is recorded in the saved folder's ``seg4diff_model.json``):

1. **Start** from ``build_tiny_sd3_pipeline(TOY_TRAINED_CONFIG, seed=seed)``: the same real
   diffusers/transformers classes and sizes as the random-weight control, except that each CLIP text
   encoder has one layer instead of two (point 5).
2. **VAE** (AutoencoderKL, factor 2, 16 latent channels): trained alone on the images with
   MSE reconstruction (inputs in [-1, 1], reparameterised posterior sample) + a small per-element KL.
   Then it is frozen and, as SD3 did for its own VAE, its latent ``shift_factor`` / ``scaling_factor``
   are set from the training latents (mean, 1 / std), so that the diffusion model sees unit-variance
   latents. The pipeline and the analysis adapter read both from the VAE config.
3. **Transformer** (SD3Transformer2DModel) with SD3's rectified-flow objective, following diffusers'
   ``train_dreambooth_sd3.py``: z = normalised VAE posterior (the mean: the trained VAE's posterior
   is nearly deterministic and the analysis encodes with the mean too), u ~ logit-normal(0, 1),
   σ = shift·u / (1 + (shift − 1)·u) with the scheduler's shift (3.0; dreambooth gets the same
   shifted σ by indexing the scheduler's sigma table with u), x_t = (1 − σ)·z + σ·ε,
   timestep = 1000·σ, target ε − z, plain MSE (the "logit_normal" scheme has unit weights).
4. **Prompts**: the dataset captions ("a red circle and a blue square"). Each training example uses
   the empty prompt with probability ``caption_dropout`` (so classifier-free guidance works with the
   stock pipeline's empty negative prompt), the class names alone in the analysis' oracle format
   ("circle square", ascending class id) with probability ``names_prob``, and the full caption
   otherwise. The class-name prompts make the analysis prompt in-distribution, so the class-name
   tokens themselves must carry the appearance of their region.
5. **Text encoders: one layer each, trained jointly** (``train_text_encoders``). SD3 feeds the
   transformer the *penultimate* CLIP hidden states; for a one-layer encoder these are the token +
   position embeddings, so each text position holds its own word and nothing else, and training
   them jointly gives the toy words learned embeddings (the probe that found grounding used learned
   word embeddings). A frozen random two-layer encoder instead spreads every prompt over all later
   positions (its causal attention is near-uniform: the padding states differ between prompts by half
   as much as the word states do), which hands the image a prompt summary outside the word tokens,
   the same shortcut as the pooled path below. Only the embeddings get gradients: the encoder layer
   feeds nothing but the pooled output, which the zeroed projection discards.
6. **Pooled-text path absent**: ``transformer.time_text_embed.text_embedder`` (the projection of the
   pooled CLIP vector that SD3 adds to the timestep embedding and feeds to every AdaLN) is set to zero
   and frozen, so its output is exactly 0 for any prompt. Through that path a tiny model learns the
   global content of the image from one vector, without having to look at the text tokens: the image
   tokens would then not need joint attention to the words, and the grounding the analysis measures
   would not form. Without it, text reaches the image only through joint attention.
7. AdamW, linear warm-up + cosine decay (over the steps or the time cap, whichever ends first), gradient
   clipping at 1, an exponential moving average of the transformer weights (saved instead of the raw
   weights), bf16 autocast on CUDA and fp32 on CPU, all random draws seeded. The folder is saved in float16
   (≈ 18 MB with the compacted tokenizer files); the VAE is rounded to float16 before the transformer is trained
   on its latents.
8. **Grounding alignment at one layer** (optional, ``align_layer``): the paper's expert layers emerge in models
   trained for months on billions of images; a toy model trained for minutes does not grow one (the harder toy
   world's three trainings without this term grounded no better than the random control: benchmarks/RESULTS.md).
   With ``align_layer`` set, the loss adds ``align_weight`` x a per-pixel cross-entropy on that layer's head-mean
   pre-softmax image->text scores (the scores MAGNET supervises, docs/method.md#magnet): each token-grid cell's
   target is the prompt token naming its labelled class, the candidates are the prompt's class-name tokens, cells
   whose class the prompt does not name (and ignore pixels) are skipped. The cross-entropy scores exactly what the
   analysis' per-pixel argmax over class tokens decides. So the toy model's expert layer is placed by its
   recipe, and the toy world shows that the pipeline finds it and what the analyses read from such a layer; it
   is not evidence that expert layers emerge.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from seg4diff_repro.progress import progress

from seg4diff_repro.attention.logits_tap import I2TLogitsTap
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.toy_shapes import TOY_CLASS_NAMES
from seg4diff_repro.datasets.toy_world import BACKGROUND, STUFF
from seg4diff_repro.models.tiny import (
    TinySD3Config,
    build_tiny_sd3_pipeline,
    check_replaceable,
    folder_size_bytes,
    save_pipeline_folder,
)

__all__ = [
    "MAX_FOLDER_BYTES",
    "TOY_TRAINED_CONFIG",
    "alignment_loss",
    "class_name_prompt",
    "class_token_positions",
    "clip_prompt_embeds",
    "tokenize_prompts",
    "train_toy_model",
]

log = logging.getLogger(__name__)

MAX_FOLDER_BYTES = 20_000_000  # the committed model folder must stay <= 20 MB
CLIP_TOKENS = 77

# The trained toy model's sizes: TinySD3Config's, except one layer per CLIP text encoder. The SD3
# pipeline reads the penultimate hidden states, which for a one-layer encoder are its token + position
# embeddings, so every text position holds its own word only (see the module docstring, point 5).
# (The harder toy world's model, TOY_WORLD_SD3_CONFIG in models/tiny_sizes.py, has one text layer too.)
TOY_TRAINED_CONFIG = replace(TinySD3Config(), text_num_layers=1)


def class_name_prompt(caption: str, class_names: Sequence[str] = TOY_CLASS_NAMES) -> str:
    """The classes of ``class_names`` named in ``caption``, ascending by class id, joined by spaces ("circle square").

    This is the analysis' oracle prompt format (docs/method.md#prompts-and-token-spans). In a vocabulary with stuff
    classes (toy-world's), a caption that names no stuff region describes objects on the background class, which
    is then named too, first (its class id is 0), as the prompts of the views with a background class name it.
    A caption naming no class is returned unchanged.
    """
    names = [name for name in class_names if name != BACKGROUND and re.search(rf"\b{name}\b", caption)]
    if not names:
        return caption
    has_stuff = any(name in STUFF for name in class_names)
    if has_stuff and BACKGROUND in class_names and not any(name in STUFF for name in names):
        names.insert(0, BACKGROUND)
    return " ".join(names)


def _lr_factor(step: int, total: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate.

    The decay follows whichever is further along: the steps done of ``total`` or ``time_fraction``, the share of the
    phase's wall-clock budget spent, so that a run stopped by its time cap has still decayed its learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_fraction)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _set_scheduled_lr(
    optimizer: torch.optim.Optimizer, peak_lr: float, step: int, total: int, warmup: int, time_fraction: float = 0.0
) -> None:
    """Give every parameter group the scheduled learning rate of ``step``."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr * _lr_factor(step, total, warmup, time_fraction)


def _budget_fraction(phase_start: float, deadline: float | None) -> float:
    """The share of the time from ``phase_start`` to ``deadline`` spent so far (0 without a deadline)."""
    if deadline is None or deadline <= phase_start:
        return 0.0
    return (time.monotonic() - phase_start) / (deadline - phase_start)


def _time_is_up(deadline: float | None, phase: str, step: int, total: int) -> bool:
    """Whether ``deadline`` has passed; if so, log the step at which the phase stops."""
    if deadline is not None and time.monotonic() > deadline:
        log.warning("%s phase stopped at step %d of %d: time budget reached", phase, step, total)
        return True
    return False


def _load_images(
    dataset_root: Path, limit: int | None, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All training images as uint8 [N, 3, H, W], their label maps as uint8 [N, H, W] and their captions."""
    dataset = SegmentationDataset(dataset_root, "train", limit=limit)
    images, labels, captions = [], [], []
    for sample in progress(dataset, total=len(dataset), desc="load images", unit="image"):
        if sample.image.shape[:2] != (image_size, image_size):
            raise ValueError(
                f"{sample.image_id} is {sample.image.shape[1]}x{sample.image.shape[0]} but the tiny model takes "
                f"{image_size}x{image_size} images; generate the training set with image_size={image_size}"
            )
        if not sample.caption:
            raise ValueError(f"{sample.image_id} has no caption in {dataset_root}/captions.json; captions are the prompts")
        images.append(torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))))
        labels.append(torch.from_numpy(np.asarray(sample.label, dtype=np.uint8)))
        captions.append(sample.caption)
    return torch.stack(images), torch.stack(labels), captions


def _to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def _round_to_half(module: torch.nn.Module) -> None:
    """Round the weights to float16 and back, so that saving in float16 later changes nothing."""
    module.half().float()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def _train_vae(vae, images_u8, *, steps, batch_size, lr, kl_weight, seed, device, autocast, log_every, deadline):
    """Train the VAE; return (steps done, first/last window losses, fixed-batch MSE before/after)."""
    torch.manual_seed(seed)  # the posterior samples use the global RNG (CPU and CUDA)
    g = torch.Generator(device).manual_seed(seed)
    n = images_u8.shape[0]
    fixed_idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:64]
    fixed = _to_pixels(images_u8[fixed_idx.to(images_u8.device)].to(device))

    @torch.no_grad()
    def fixed_mse() -> float:
        vae.eval()
        with autocast():
            rec = vae.decode(vae.encode(fixed).latent_dist.mean).sample
        vae.train()
        return F.mse_loss(rec.float(), fixed).item()

    mse_before = fixed_mse()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    warmup = max(1, min(200, steps // 10))
    vae.train()
    window, first, last, done = [], None, None, 0
    bar = progress(range(steps), desc="train VAE", unit="step")
    for step in bar:
        if _time_is_up(deadline, "VAE", step, steps):
            break
        _set_scheduled_lr(optimizer, lr, step, steps, warmup)
        idx = torch.randint(n, (batch_size,), generator=g, device=device).to(images_u8.device)
        x = _to_pixels(images_u8[idx].to(device, non_blocking=True))
        with autocast():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
            rec = vae.decode(z).sample
        mse = F.mse_loss(rec.float(), x)
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        window.append(loss.detach())
        if done % log_every == 0 or done == steps:
            last = torch.stack(window).mean().item()
            first = last if first is None else first
            window = []
            bar.set_postfix(loss=f"{last:.4f}")
            log.info("VAE step %d/%d: loss %.5f (mean of the last steps; now mse %.5f, kl/elem %.3f)",
                     done, steps, last, mse.item(), kl.item())
    vae.eval()
    mse_after = fixed_mse()
    return done, first, last, mse_before, mse_after


@torch.no_grad()
def _encode_latent_means(vae, images_u8, device, batch_size=256) -> torch.Tensor:
    means = []
    for start in range(0, images_u8.shape[0], batch_size):
        x = _to_pixels(images_u8[start : start + batch_size].to(device))
        means.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(means)


def tokenize_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-L and CLIP-G token ids [N, 77] of ``prompts``, padded and truncated as the SD3 pipeline does."""
    return tuple(
        tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt").input_ids
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)
    )


def clip_prompt_embeds(pipe, ids_l: torch.Tensor, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SD3 pipeline's ``encode_prompt`` without T5, differentiable and from token ids.

    CLIP-L ⊕ CLIP-G penultimate hidden states along channels, zero-padded to joint_attention_dim, then 77
    zero "T5" rows along the sequence: [B, 154, D]; pooled = CLIP-L ⊕ CLIP-G projections [B, P].
    (tests/test_train_toy.py checks it against ``pipe.encode_prompt``.)
    """
    states, pooled = [], []
    for encoder, ids in ((pipe.text_encoder, ids_l), (pipe.text_encoder_2, ids_g)):
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        states.append(out.hidden_states[-2])
    clip = torch.cat(states, dim=-1)
    dim = pipe.transformer.config.joint_attention_dim
    clip = F.pad(clip, (0, dim - clip.shape[-1]))
    t5 = clip.new_zeros(clip.shape[0], CLIP_TOKENS, dim)
    return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)


def class_token_positions(tokenizer, prompts: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
    """[P, C]: the position among each prompt's 77 CLIP token ids of the first token naming class c (-1: not named).

    Every class name must be a single token (the toy vocabularies' are), so that one position stands for a class.
    """
    word_ids = []
    for name in class_names:
        ids = tokenizer(name, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"class name {name!r} is {len(ids)} CLIP tokens {ids}; the alignment loss needs class "
                             "names of one token each (rename the class in the dataset's classes.json)")
        word_ids.append(ids[0])
    ids = tokenizer(list(prompts), padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    positions = torch.full((len(prompts), len(class_names)), -1, dtype=torch.long)
    for c, word in enumerate(word_ids):
        hits = ids == word
        positions[:, c] = torch.where(hits.any(1), hits.int().argmax(1), -1)
    return positions


def alignment_loss(i2t_logits: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-cell cross-entropy of head-mean image->text scores over each prompt's class-name tokens.

    ``i2t_logits`` [B, heads, N, T] pre-softmax scores of N image tokens against T text tokens; ``positions``
    [B, C] the token naming each class (-1: not named, see class_token_positions); ``labels`` [B, N] the class of
    each image token (C or more: ignore). Cells whose class the prompt does not name are skipped; the mean is over
    the cells scored (0 when there are none).
    """
    scores = i2t_logits.float().mean(1)
    batch, _, n_text = scores.shape
    n_classes = positions.shape[1]
    # Scatter the named positions into a [B, T + 1] candidate mask; unnamed classes (-1) land in the extra column.
    candidates = torch.zeros(batch, n_text + 1, dtype=torch.bool, device=scores.device)
    candidates.scatter_(1, torch.where(positions >= 0, positions, n_text), True)
    scores = scores.masked_fill(~candidates[:, None, :n_text], -1e4)
    labels = labels.long()
    known = labels < n_classes
    target = torch.where(known, positions.gather(1, labels.clamp(max=n_classes - 1)), -1)
    total = F.cross_entropy(scores.transpose(1, 2), target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp(min=1)


def train_toy_model(
    dataset_root: str | Path,
    out_dir: str | Path,
    *,
    vae_steps: int = 2000,
    transformer_steps: int = 5000,
    batch_size: int = 256,
    lr: float = 5e-4,
    vae_lr: float = 1e-3,
    vae_batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 100,
    caption_dropout: float = 0.1,
    names_prob: float = 0.3,
    kl_weight: float = 1e-4,
    ema_decay: float = 0.999,
    weight_decay: float = 1e-4,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    train_text_encoders: bool = True,
    limit: int | None = None,
    max_wall_s: float | None = None,
    config: TinySD3Config = TOY_TRAINED_CONFIG,
    init_from: str | Path | None = None,
    compile_transformer: bool = False,
    align_layer: int | None = None,
    align_weight: float = 0.5,
) -> dict[str, Any]:
    """Train the tiny pipeline on the ``train`` split of ``dataset_root`` and save it into ``out_dir``.

    ``batch_size`` is the transformer's batch; the VAE's is ``vae_batch_size`` (default: the same).
    Returns the ``seg4diff_model.json`` record. ``max_wall_s`` is a safety cap: the VAE phase stops
    after 25% of it and the transformer phase at 100%, and the record says how many steps were done.
    ``init_from`` continues an earlier run: its saved folder (weights of every component, VAE included, whose
    training then takes ``vae_steps`` more steps: 0 keeps it) replaces the random initialisation, and its record
    is kept in this one's ``init_from``, so that the whole recipe stays on record. ``compile_transformer`` runs the
    transformer's training passes through ``torch.compile`` (the same computation, faster on a GPU).
    ``align_layer``: the joint layer whose image->text scores ``align_weight`` x alignment_loss trains against the
    labels (module docstring, point 8); None: the flow loss alone.
    """
    for name, value in (("vae_steps", vae_steps), ("transformer_steps", transformer_steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if batch_size < 1 or log_every < 1 or (vae_batch_size is not None and vae_batch_size < 1):
        raise ValueError(
            f"batch_size, vae_batch_size and log_every must be >= 1, got {batch_size}, {vae_batch_size}, {log_every}"
        )
    if not (0 <= caption_dropout and 0 <= names_prob and caption_dropout + names_prob <= 1):
        raise ValueError(f"need caption_dropout, names_prob >= 0 with a sum <= 1, got {caption_dropout}, {names_prob}")
    if align_layer is not None and not 0 <= align_layer < config.num_layers:
        raise ValueError(f"align_layer must be a joint layer 0..{config.num_layers - 1} of these sizes, got {align_layer}")
    if align_weight < 0:
        raise ValueError(f"align_weight must be >= 0, got {align_weight}")
    check_replaceable(Path(out_dir))  # fail now, not after the training
    start_time = time.monotonic()
    deadline = None if max_wall_s is None else start_time + max_wall_s
    device_t = torch.device(device)
    if device_t.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device_type=device_t.type, dtype=torch.bfloat16, enabled=device_t.type == "cuda")

    images_u8, labels_u8, captions = _load_images(Path(dataset_root), limit, config.image_size)
    log.info("%d training images from %s", len(captions), dataset_root)
    if device_t.type == "cuda":
        images_u8 = images_u8.to(device_t)

    earlier_record = None
    if init_from is None:
        pipe = build_tiny_sd3_pipeline(config, seed=seed)
    else:
        from seg4diff_repro.models.sd3 import load_sd3_pipeline

        earlier_record = json.loads((Path(init_from) / "seg4diff_model.json").read_text())
        if earlier_record["config"] != json.loads(json.dumps(asdict(config))):
            raise ValueError(f"{init_from} was trained with other sizes than asked for: its seg4diff_model.json config "
                             f"is {earlier_record['config']}; ask for those sizes")
        pipe = load_sd3_pipeline(init_from, torch.float32)
    vae, transformer = pipe.vae, pipe.transformer
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for encoder in encoders:
        _round_to_half(encoder)
        encoder.requires_grad_(train_text_encoders).train(train_text_encoders)
    pipe.to(device_t)

    # --- phase 1: VAE -------------------------------------------------------------------------
    vae_done, vae_first, vae_last, vae_mse_before, vae_mse_after = _train_vae(
        vae, images_u8, steps=vae_steps, batch_size=vae_batch_size or batch_size, lr=vae_lr, kl_weight=kl_weight, seed=seed,
        device=device_t, autocast=autocast, log_every=log_every,
        deadline=None if max_wall_s is None else start_time + 0.25 * max_wall_s,
    )
    _round_to_half(vae)
    vae.requires_grad_(False).eval()
    means = _encode_latent_means(vae, images_u8, device_t)
    shift, std = means.mean().item(), means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    latents = (means - shift) / std
    del means
    # Each image token's class: the label at the top-left pixel of the token's patch (row-major, as SD3 patchifies).
    stride = config.image_size // (latents.shape[-1] // transformer.config.patch_size)
    token_labels = labels_u8[:, ::stride, ::stride].flatten(1).to(device_t)
    psnr = 10 * math.log10(4.0 / vae_mse_after) if vae_mse_after > 0 else float("inf")
    log.info("VAE: fixed-batch MSE %.5f -> %.5f (PSNR %.1f dB); latent shift %.4f, scale %.4f",
             vae_mse_before, vae_mse_after, psnr, shift, 1 / std)
    vae_time = time.monotonic() - start_time

    # --- phase 2: transformer -----------------------------------------------------------------
    vocabulary = json.loads((Path(dataset_root) / "classes.json").read_text())["names"]
    names = [class_name_prompt(c, vocabulary) for c in captions]
    unique = sorted(set(captions) | set(names) | {""})
    index = {p: i for i, p in enumerate(unique)}
    ids_l, ids_g = (ids.to(device_t) for ids in tokenize_prompts(pipe, unique))
    if not train_text_encoders:  # frozen: every distinct prompt is encoded once
        with torch.no_grad():
            bank, pooled_bank = clip_prompt_embeds(pipe, ids_l, ids_g)
    full_idx = torch.tensor([index[c] for c in captions], device=device_t)
    names_idx = torch.tensor([index[c] for c in names], device=device_t)
    empty_idx = index[""]
    if align_layer is not None:
        positions = class_token_positions(pipe.tokenizer, unique, vocabulary).to(device_t)
    log.info("%d distinct prompts (captions, class-name prompts and the empty prompt)", len(unique))

    text_embedder = transformer.time_text_embed.text_embedder
    with torch.no_grad():
        for p in text_embedder.parameters():
            p.zero_()
    text_embedder.requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if train_text_encoders:
        # Only the embeddings receive gradients: the encoder layer feeds the pooled output alone, which
        # the zeroed text_embedder discards. Parameters without a gradient are skipped by AdamW.
        params += [p for encoder in encoders for p in encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device_t.type == "cuda")
    ema = _Ema(params, ema_decay)
    shift_t = float(pipe.scheduler.config.shift)
    warmup = max(1, min(500, transformer_steps // 10))
    torch.manual_seed(seed)
    g = torch.Generator(device_t).manual_seed(seed)
    n = latents.shape[0]

    def sample_batch(generator: torch.Generator):
        """Images, prompt variants, σ and noise of one batch, all drawn on the device from ``generator``."""
        idx = torch.randint(n, (batch_size,), generator=generator, device=device_t)
        r = torch.rand(batch_size, generator=generator, device=device_t)
        prompt_idx = torch.where(
            r < caption_dropout,
            torch.full_like(idx, empty_idx),
            torch.where(r < caption_dropout + names_prob, names_idx[idx], full_idx[idx]),
        )
        u = torch.sigmoid(torch.randn(batch_size, generator=generator, device=device_t) * logit_std + logit_mean)
        sigma = shift_t * u / (1 + (shift_t - 1) * u)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=generator, device=device_t)
        return idx, prompt_idx, sigma, noise

    # The compiled module shares the transformer's parameters: the optimiser, the EMA and the saved folder see them.
    # Only training steps go through it; the fixed-batch evaluations run eagerly.
    training_forward = torch.compile(transformer) if compile_transformer else transformer
    # Entered once for the whole training: one processor object for the compiler to trace, not one per step.
    tap = I2TLogitsTap(transformer, align_layer, CLIP_TOKENS) if align_layer is not None else nullcontext()

    def losses(idx, prompt_idx, sigma, noise, forward=transformer) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow-matching loss and the alignment loss (0 without align_layer) of one batch."""
        z = latents[idx]
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * z + s * noise
        with autocast():
            if train_text_encoders:
                context, pooled = clip_prompt_embeds(pipe, ids_l[prompt_idx], ids_g[prompt_idx])
            else:
                context, pooled = bank[prompt_idx], pooled_bank[prompt_idx]
            pred = forward(
                hidden_states=noisy,
                timestep=sigma * 1000,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        flow = F.mse_loss(pred.float(), noise - z)
        if align_layer is None:
            return flow, flow.new_zeros(())
        return flow, alignment_loss(tap.logits, positions[prompt_idx], token_labels[idx])

    def objective(flow: torch.Tensor, align: torch.Tensor) -> torch.Tensor:
        return flow + align_weight * align

    fixed_batch = sample_batch(torch.Generator(device_t).manual_seed(seed + 2))

    @torch.no_grad()
    def fixed_loss() -> tuple[float, float]:
        """The flow and alignment losses of a fixed batch, in eval mode."""
        modules = (transformer, *encoders) if train_text_encoders else (transformer,)
        for module in modules:
            module.eval()
        flow, align = (value.item() for value in losses(*fixed_batch))
        for module in modules:
            module.train()
        return flow, align

    with tap:
        tr_before, align_before = fixed_loss()
        transformer.train()
        tr_first = tr_last = align_first = align_last = None
        tr_done, window, align_window = 0, [], []
        bar = progress(range(transformer_steps), desc="train transformer", unit="step")
        phase_start = time.monotonic()
        for step in bar:
            if _time_is_up(deadline, "transformer", step, transformer_steps):
                break
            _set_scheduled_lr(optimizer, lr, step, transformer_steps, warmup, _budget_fraction(phase_start, deadline))
            batch = sample_batch(g)
            optimizer.zero_grad(set_to_none=True)
            try:
                flow, align = losses(*batch, forward=training_forward)
                objective(flow, align).backward()
            except Exception:  # noqa: BLE001 - whatever breaks the compiler: train eagerly rather than not at all
                if training_forward is transformer:
                    raise
                log.exception("torch.compile failed at step %d: training on without it", step)
                training_forward, compile_transformer = transformer, False
                optimizer.zero_grad(set_to_none=True)
                flow, align = losses(*batch)
                objective(flow, align).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            ema.update()
            tr_done = step + 1
            window.append(flow.detach())
            align_window.append(align.detach())
            if (step + 1) % log_every == 0 or step + 1 == transformer_steps:
                mean_loss, mean_align = torch.stack(window).mean().item(), torch.stack(align_window).mean().item()
                window, align_window = [], []
                tr_first = mean_loss if tr_first is None else tr_first
                align_first = mean_align if align_first is None else align_first
                tr_last, align_last = mean_loss, mean_align
                bar.set_postfix(loss=f"{mean_loss:.4f}", align=f"{mean_align:.4f}")
                log.info("transformer step %d/%d: flow loss %.5f, alignment loss %.5f (means of the last steps), lr %.2e",
                         step + 1, transformer_steps, mean_loss, mean_align, optimizer.param_groups[0]["lr"])
        tr_raw_after, align_raw_after = fixed_loss()
        if tr_done:
            ema.copy_to_params()
        tr_after, align_after = fixed_loss()
    for module in (transformer, *encoders):
        module.requires_grad_(False).eval()
    train_time = time.monotonic() - start_time
    log.info("transformer: fixed-batch flow loss %.4f -> %.4f (EMA; raw weights %.4f), alignment loss %.4f -> %.4f",
             tr_before, tr_after, tr_raw_after, align_before, align_after)

    # --- save ---------------------------------------------------------------------------------
    pipe.to("cpu")
    for module in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(torch.float16)
    import diffusers
    import transformers

    record: dict[str, Any] = {
        "kind": "toy-trained",
        "seed": seed,
        "steps": {"vae": vae_done, "transformer": tr_done},
        "steps_requested": {"vae": vae_steps, "transformer": transformer_steps},
        "batch": {"vae": vae_batch_size or batch_size, "transformer": batch_size},
        "lr": {"transformer": lr, "vae": vae_lr},
        "final_losses": {
            "vae_train_first": vae_first,
            "vae_train_last": vae_last,
            "vae_fixed_batch_mse_before": vae_mse_before,
            "vae_fixed_batch_mse_after": vae_mse_after,
            "vae_psnr_db": psnr,
            "transformer_train_first": tr_first,
            "transformer_train_last": tr_last,
            "transformer_fixed_batch_before": tr_before,
            "transformer_fixed_batch_after_raw": tr_raw_after,
            "transformer_fixed_batch_after_ema": tr_after,
            "alignment_train_first": align_first if align_layer is not None else None,
            "alignment_train_last": align_last if align_layer is not None else None,
            "alignment_fixed_batch_before": align_before if align_layer is not None else None,
            "alignment_fixed_batch_after_raw": align_raw_after if align_layer is not None else None,
            "alignment_fixed_batch_after_ema": align_after if align_layer is not None else None,
        },
        "wall_time_s": {"vae": round(vae_time, 1), "total_training": round(train_time, 1)},
        "device": device,
        "device_name": _device_name(device_t),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "dataset": {"root": str(dataset_root), "split": "train", "images": len(captions), "limit": limit},
        "recipe": {
            "vae": "MSE on [-1,1] + kl_weight x per-element KL, reparameterised sample; latent shift/scale = "
            "mean and 1/std of the training posterior means",
            "vae_kl_weight": kl_weight,
            "vae_latent_shift_factor": shift,
            "vae_latent_scaling_factor": 1.0 / std,
            "transformer": "rectified flow (SD3): sigma = shifted logit-normal, x_t = (1-s) z + s eps, "
            "timestep = 1000 s, target eps - z, MSE",
            "logit_mean": logit_mean,
            "logit_std": logit_std,
            "sigma_shift": shift_t,
            "caption_dropout": caption_dropout,
            "class_name_prompt_prob": names_prob,
            "text_encoders": (
                "trained jointly (one layer each: the token and position embeddings that SD3's penultimate "
                "hidden states read here)"
                if train_text_encoders
                else "frozen (random weights, float16-rounded)"
            ),
            "pooled_text_projection": "zeroed and frozen: text reaches the image only through joint attention",
            "optimizer": "AdamW",
            "weight_decay": weight_decay,
            "schedule": "linear warm-up, cosine decay to 10% over the steps or the time cap, whichever ends first",
            "grad_clip": 1.0,
            "ema_decay": ema_decay,
            "autocast": "bf16" if device_t.type == "cuda" else "none (fp32)",
            "saved_dtype": "float16",
            "max_wall_s": max_wall_s,
            "compiled": compile_transformer,
            "alignment": None if align_layer is None else {
                "layer": align_layer,
                "weight": align_weight,
                "loss": "per-cell cross-entropy of the layer's head-mean pre-softmax image->text scores over the "
                "prompt's class-name tokens; target: the token naming the cell's label (label at the patch's "
                "top-left pixel), cells of unnamed classes skipped; total = flow + weight x alignment",
            },
        },
        "config": asdict(config),
        "init_from": None if init_from is None else {"folder": str(init_from), "record": earlier_record},
    }
    weights_bytes = sum(
        sum(p.numel() * p.element_size() for p in m.parameters())
        for m in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2)
    )
    record["weights_mb"] = round(weights_bytes / 1e6, 2)
    save_pipeline_folder(pipe, Path(out_dir), record, max_bytes=MAX_FOLDER_BYTES, compact_tokenizers=True)
    record["folder_mb"] = round(folder_size_bytes(Path(out_dir)) / 1e6, 2)
    log.info("saved %s (%.1f MB) after %.0f s", out_dir, record["folder_mb"], time.monotonic() - start_time)
    return record
