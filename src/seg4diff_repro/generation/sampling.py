"""Text-to-image sampling for SD3-architecture pipelines, with I2T perturbation and perturbed-I2T guidance.

A plain flow-matching Euler loop equal to the stock `StableDiffusion3Pipeline` call (tested), plus:

- ``perturb_layers``: generate with the I2T block of those layers blurred (appendix A.3, Figs. 5, 18);
- ``guidance_layers`` with scale ``s``: ε̃ = ε_u + w(ε_c − ε_u) + s(ε_c − ε̂_c), where ε̂_c is the
  conditional prediction with those layers blurred (PAG/SEG convention, method_spec §E; Fig. 19).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seg4diff_repro.attention.perturb import I2TPerturbation


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
    max_sequence_length: int = 77


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
