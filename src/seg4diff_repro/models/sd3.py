"""SD3 / SD3.5 adapter: the Seg4Diff zero-shot forward pass on a `StableDiffusion3Pipeline`.

What it does follows the official code (docs/method.md#image-preprocessing, docs/method.md#noising-and-timesteps,
docs/method.md#prompts-and-token-spans): VAE posterior mean with the model's shift
and scale, noise to a scheduler index ("t = k of N" is ``timesteps[-k]``), CLIP-only text with T5
off (77 zero T5 positions, 154 text tokens), one transformer forward, no classifier-free guidance.
Unlike the official code the noise is seeded per image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seg4diff_repro.models.common import (
    ModelLoadError,
    Noising,
    apply_model_lora,
    encode_normalised_latents,
    load_pipeline,
    noise_latents_per_image,
    noising_at_step,
)

__all__ = ["CLIP_TOKENS", "ModelLoadError", "Noising", "SD3Adapter", "load_sd3_pipeline"]

# The CLIP context length; the zero "T5" block gets the same length, as in the official code.
CLIP_TOKENS = 77


def load_sd3_pipeline(source: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load a `StableDiffusion3Pipeline` without T5 (the official setting) from a hub id or a local folder."""
    from diffusers import StableDiffusion3Pipeline

    return load_pipeline(StableDiffusion3Pipeline, source, dtype, revision, text_encoder_3=None, tokenizer_3=None)


class SD3Adapter:
    """The Seg4Diff analysis forward pass for SD3-medium, SD3.5-medium and tiny SD3-architecture models."""

    backbone = "sd3"
    image_first = True  # joint sequence order: [image tokens ; text tokens]
    prompt_start = 1  # a class's CLIP tokens start after <sos>
    prompt_tokens = CLIP_TOKENS  # text positions the maps keep: the CLIP tokens, not the zero T5 block

    def __init__(self, pipe, device: str | torch.device = "cpu"):
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.transformer = pipe.transformer
        self.lora_info: dict | None = None  # adapter.json of the MAGNET adapter applied (from_pretrained's lora)
        self.dtype = pipe.transformer.dtype
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        lora: str | Path | None = None,
    ) -> SD3Adapter:
        """Load the pipeline; ``lora``: a MAGNET adapter folder to apply to its transformer after loading."""
        adapter = cls(load_sd3_pipeline(source, dtype, revision), device)
        apply_model_lora(adapter, lora)
        return adapter

    @property
    def tokenizer(self):
        """The CLIP-L tokenizer, whose token positions define the text columns of the maps."""
        return self.pipe.tokenizer

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def image_size(self) -> int:
        """Pixel side of the square input (1024 for SD3-medium)."""
        return self.transformer.config.sample_size * self.pipe.vae_scale_factor

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.transformer.config.sample_size // self.transformer.config.patch_size
        return side, side

    @property
    def num_text_tokens(self) -> int:
        return 2 * CLIP_TOKENS

    def noising(self, k: int, num_steps: int) -> Noising:
        """``timesteps[-k]`` of an ``num_steps`` schedule: k = 8 of 28 is index 20, σ ≈ 0.515 for SD3."""
        scheduler = self.pipe.scheduler
        return noising_at_step(scheduler, k, num_steps, lambda: scheduler.set_timesteps(num_steps))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] at ``image_size`` → normalised VAE posterior means."""
        return encode_normalised_latents(self.pipe.vae, 2 * images - 1, self.device)

    def noise_latents(self, latents: torch.Tensor, noising: Noising, seeds: list[int]) -> torch.Tensor:
        """x_t = (1 − σ)·z + σ·ε with ε drawn per image from its own seed (the stock ``scale_noise``)."""
        self.pipe.scheduler.set_timesteps(noising.num_steps)
        return noise_latents_per_image(self.pipe.scheduler, latents, noising.index, seeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-L ⊕ CLIP-G penultimate states (channels) + 77 zero T5 rows: [B, 154, D] and pooled [B, 2048]."""
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=CLIP_TOKENS,
        )
        return prompt_embeds.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def forward(
        self, noisy_latents: torch.Tensor, noising: Noising, prompt_embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        timestep = torch.full((noisy_latents.shape[0],), noising.timestep, device=self.device)
        return self.transformer(
            hidden_states=noisy_latents.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
