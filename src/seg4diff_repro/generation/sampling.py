"""Text-to-image sampling for SD3- and Flux-architecture pipelines, with I2T perturbation and perturbed-I2T guidance.

SD3/SD3.5 (`generate`): a plain flow-matching Euler loop equal to the stock `StableDiffusion3Pipeline`
call (tested), plus:

- ``perturb_layers``: generate with the I2T block of those layers blurred (appendix A.3, Figs. 5, 18);
- ``guidance_layers`` with scale ``s``: ε̃ = ε_u + w(ε_c − ε_u) + s(ε_c − ε̂_c), where ε̂_c is the
  conditional prediction with those layers blurred (PAG/SEG convention, docs/method.md#perturbed-i2t-guidance; Fig. 19).

Flux (`generate_flux`): the stock `FluxPipeline` call (guidance-distilled, no classifier-free guidance)
inside an `I2TPerturbation` context; perturbation only (Fig. 10).

`sample_images` picks the right one and batches the prompts; `truncated_prompts` warns about prompts
longer than the text encoders' window, which the pipelines truncate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from seg4diff_repro.progress import progress

from seg4diff_repro.attention.perturb import I2TPerturbation

__all__ = [
    "PromptTruncationWarning",
    "SamplingSettings",
    "generate",
    "generate_flux",
    "initial_latents",
    "is_flux_pipeline",
    "sample_images",
    "truncated_prompts",
]


class PromptTruncationWarning(UserWarning):
    """A prompt has more tokens than the text encoder's window; the pipeline keeps only the first ones."""


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 28
    cfg: float = 7.5
    perturb_layers: tuple[int, ...] = ()
    perturb_branch: str = "all"
    guidance_layers: tuple[int, ...] = ()
    guidance_scale: float = 3.0
    blur_sigma: float = 9.0
    blur_kernel: int = 5
    blur_text_tokens: int | None = None
    # SD3 runs without T5, so only Flux reads it: its T5 prompt length (the stock FluxPipeline uses 512).
    max_sequence_length: int = 77
    # Flux's guidance-embedding value (FLUX.1-dev is guidance-distilled; 3.5 in the official code).
    distilled_guidance: float = 3.5


def is_flux_pipeline(pipe) -> bool:
    return type(pipe.transformer).__name__ == "FluxTransformer2DModel"


def truncated_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 77) -> list[dict]:
    """Warn (``PromptTruncationWarning``) about every prompt longer than a text encoder's window; return them.

    The windows are CLIP's 77 tokens (SD3's two CLIP encoders share the BPE, so CLIP-L's count holds for
    both; Flux's pooled CLIP-L) and, for Flux, the T5 ``max_sequence_length``. Counts include the
    special tokens the pipelines add (<sos>/<eos>, T5's </s>).
    """
    windows = [("CLIP", pipe.tokenizer, pipe.tokenizer.model_max_length)]
    if is_flux_pipeline(pipe):
        windows.append(("T5", pipe.tokenizer_2, max_sequence_length))
    found = []
    for prompt in dict.fromkeys(prompts):
        for name, tokenizer, window in windows:
            count = len(tokenizer(prompt, truncation=False)["input_ids"])
            if count > window:
                message = (f"prompt {prompt!r} has {count} {name} tokens, more than the {window}-token window: "
                           f"the text encoder sees only the first {window}")
                warnings.warn(message, PromptTruncationWarning, stacklevel=2)
                found.append({"prompt": prompt, "tokenizer": name, "tokens": count, "window": window})
    return found


def initial_latents(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Seeded starting noise, one generator per image (independent of the batch)."""
    channels = pipe.transformer.config.in_channels
    shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], settings: SamplingSettings = SamplingSettings(),
    height: int | None = None, width: int | None = None,
) -> np.ndarray:
    """Images [B, H, W, 3] uint8 for ``prompts`` with one seed each."""
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    use_cfg = settings.cfg > 1
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=use_cfg,
        negative_prompt=[""] * len(prompts), max_sequence_length=settings.max_sequence_length,
    )
    latents = initial_latents(pipe, seeds, height, width).to(device, dtype)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(settings.steps, device=device)
    blur = {"sigma": settings.blur_sigma, "kernel_size": settings.blur_kernel, "text_tokens": settings.blur_text_tokens}

    def predict(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text,
            pooled_projections=pooled_text, return_dict=False,
        )[0]

    perturbation = I2TPerturbation(pipe.transformer, settings.perturb_layers, branch=settings.perturb_branch, **blur)
    with perturbation:
        for t in scheduler.timesteps:
            if use_cfg:
                both = predict(torch.cat([latents] * 2), t, torch.cat([negative, embeds]),
                               torch.cat([negative_pooled, pooled]))
                uncond, cond = both.chunk(2)
                velocity = uncond + settings.cfg * (cond - uncond)
            else:
                cond = velocity = predict(latents, t, embeds, pooled)
            if settings.guidance_layers:
                with I2TPerturbation(pipe.transformer, settings.guidance_layers, **blur):
                    perturbed = predict(latents, t, embeds, pooled)
                velocity = velocity + settings.guidance_scale * (cond - perturbed)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (images * 255).round().astype(np.uint8)


@torch.no_grad()
def generate_flux(
    pipe, prompts: list[str], seeds: list[int], settings: SamplingSettings = SamplingSettings(),
    height: int | None = None, width: int | None = None,
) -> np.ndarray:
    """Images [B, H, W, 3] uint8 from the stock `FluxPipeline` call, with ``settings.perturb_layers`` blurred.

    The default size is the VAE config's ``sample_size`` (1024 for FLUX.1-dev), as in `FluxAdapter`.
    """
    if settings.guidance_layers:
        raise ValueError("perturbed-I2T guidance is implemented for SD3 pipelines only (the paper's Fig. 19 is SD3)")
    if settings.perturb_branch != "all":
        raise ValueError("Flux has no classifier-free-guidance batch: use perturb_branch='all'")
    size = int(pipe.vae.config.sample_size)
    # One CPU generator per image, so an image does not depend on the device or on the batching.
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    perturbation = I2TPerturbation(
        pipe.transformer, settings.perturb_layers, sigma=settings.blur_sigma, kernel_size=settings.blur_kernel,
        text_tokens=settings.blur_text_tokens,
    )
    with perturbation:
        images = pipe(
            prompt=prompts, height=height or size, width=width or size, num_inference_steps=settings.steps,
            guidance_scale=settings.distilled_guidance, generator=generators,
            max_sequence_length=settings.max_sequence_length, output_type="np",
        ).images
    return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)


def sample_images(
    pipe, prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings = SamplingSettings(),
    batch_size: int = 4,
) -> list[np.ndarray]:
    """One HxWx3 uint8 image per (prompt, seed) pair, in batches, from an SD3 or a Flux pipeline.

    Over-long prompts are truncated silently here: check them first with `truncated_prompts`.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    run = generate_flux if is_flux_pipeline(pipe) else generate
    pipe.set_progress_bar_config(disable=True)  # our bar counts images; the pipeline's would count steps
    images: list[np.ndarray] = []
    with progress(total=len(prompts), desc="images", unit="image") as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            images += list(run(pipe, list(prompts[chunk]), [int(s) for s in seeds[chunk]], settings))
            bar.update(len(images) - bar.n)
    return images
