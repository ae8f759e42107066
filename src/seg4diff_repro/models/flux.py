"""Flux adapter: the Seg4Diff zero-shot forward pass on a `FluxPipeline` (FLUX.1-dev or the tiny Flux model).

It follows the official Flux path (docs/method.md#flux-specifics):

* text: 77 T5 tokens (``max_sequence_length = 77``) as the sequence, CLIP-L's pooled output as
  ``pooled_projections``; the joint sequence is ``[77 text ; image]`` (text first) and a class's T5
  tokens start at position 0 (no ``<sos>``);
* image: VAE posterior mean of the image **kept in [0, 1]** (the official code skips the 2x−1 step;
  ``scale_to_unit_range=True`` adds it), latent = (mean − shift)·scale;
* time: the 50-step Flux schedule (sigmas linspace(1, 1/50) with dynamic shift) and ``timesteps[-k]``.
  The official code computes the shift ``mu`` from the **latent channel count 16** instead of the
  image sequence length (``mu_from_channels=True``, the default, reproduces that bug: σ = 0.2317 at
  k = 8 of 50 for 4096 image tokens; ``False`` gives the intended σ = 0.3756);
* one transformer forward on the packed latents with timestep σ (= timestep / 1000), guidance 3.5 and
  the ``img_ids`` / ``txt_ids`` that `FluxPipeline` builds; no classifier-free guidance.

Latents are handled unpacked ([B, 16, h, w], as in `SD3Adapter`); `forward` packs them into 2x2
patches for the transformer and unpacks its prediction. Unlike the official code the noise is seeded
per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

__all__ = [
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_GUIDANCE",
    "FLUX_NUM_STEPS",
    "FLUX_TEXT_TOKENS",
    "FluxAdapter",
    "flux_double_stream_blocks",
    "flux_mu",
    "flux_noising",
    "load_flux_pipeline",
]

FLUX_TEXT_TOKENS = 77  # max_sequence_length = tokenizer_max_length (CLIP's 77) in the official code
FLUX_GUIDANCE = 3.5
FLUX_NUM_STEPS = 50
# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev.
FLUX_DEV_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def flux_double_stream_blocks(source: str | Path) -> int:
    """How many double-stream (MM-DiT) blocks the Flux transformer at ``source`` has (19 for FLUX.1-dev): its
    layers from this index on are single-stream blocks. Reads only ``transformer/config.json`` (local folder or hub
    cache)."""
    from diffusers import FluxTransformer2DModel

    try:
        config = FluxTransformer2DModel.load_config(str(source), subfolder="transformer")
    except OSError as error:
        raise ModelLoadError(
            f"cannot read transformer/config.json of the Flux model {source}: {error}. Point the model's `source` "
            "at a folder written by `save_pretrained` or at a hub id this machine has downloaded."
        ) from error
    return int(config["num_layers"])


def flux_mu(scheduler_config, image_seq_len: int, latent_channels: int, mu_from_channels: bool = True) -> float:
    """The dynamic-shift ``mu`` of `FluxPipeline`'s ``calculate_shift`` with the scheduler's config.

    ``mu_from_channels=True`` feeds it the latent channel count (the official code's ``shape[1]`` of the
    unpacked latent, 16): mu = 0.4594 for FLUX.1-dev. ``False`` feeds the image sequence length as
    `FluxPipeline` does: mu = 1.15 at 4096 tokens.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get
    return float(
        calculate_shift(
            latent_channels if mu_from_channels else image_seq_len,
            get("base_image_seq_len", 256),
            get("max_image_seq_len", 4096),
            get("base_shift", 0.5),
            get("max_shift", 1.15),
        )
    )


def _set_flux_timesteps(scheduler, num_steps: int, mu: float) -> None:
    # FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by the scheduler with `mu`.
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


def flux_noising(scheduler, k: int, num_steps: int, mu: float) -> Noising:
    """``timesteps[-k]`` of the ``num_steps`` Flux schedule with shift ``mu`` (k = 8 of 50 is index 42)."""
    return noising_at_step(scheduler, k, num_steps, lambda: _set_flux_timesteps(scheduler, num_steps, mu))


def load_flux_pipeline(source: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load a `FluxPipeline` (both text encoders) from a Hugging Face id or a local folder."""
    from diffusers import FluxPipeline

    return load_pipeline(FluxPipeline, source, dtype, revision)


class FluxAdapter:
    """The Seg4Diff analysis forward pass for FLUX.1-dev and tiny Flux-architecture models."""

    backbone = "flux"
    image_first = False  # joint sequence order: [text tokens ; image tokens]
    prompt_start = 0  # T5 has no <sos>: a prompt's first token is position 0
    prompt_tokens = FLUX_TEXT_TOKENS

    def __init__(
        self,
        pipe,
        device: str | torch.device = "cpu",
        *,
        mu_from_channels: bool = True,
        scale_to_unit_range: bool = False,
        guidance_scale: float = FLUX_GUIDANCE,
        image_size: int | None = None,
    ):
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.transformer = pipe.transformer
        self.lora_info: dict | None = None  # adapter.json of the MAGNET adapter applied (from_pretrained's lora)
        self.dtype = pipe.transformer.dtype
        self.mu_from_channels = mu_from_channels
        self.scale_to_unit_range = scale_to_unit_range
        self.guidance_scale = guidance_scale
        self._image_size = image_size
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval().requires_grad_(False)
        side = self.image_size // (2 * pipe.vae_scale_factor)
        if side * 2 * pipe.vae_scale_factor != self.image_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {2 * pipe.vae_scale_factor} "
                "(VAE factor x the 2x2 latent packing)"
            )

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        lora: str | Path | None = None,
        **options,
    ) -> FluxAdapter:
        """Load the pipeline; ``lora``: a MAGNET adapter folder to apply to its transformer after loading."""
        adapter = cls(load_flux_pipeline(source, dtype, revision), device, **options)
        apply_model_lora(adapter, lora)
        return adapter

    @property
    def tokenizer(self):
        """The T5 tokenizer, whose token positions (from 0, ``</s>`` not counted) define the text columns."""
        return self.pipe.tokenizer_2

    @property
    def num_layers(self) -> int:
        """Double-stream blocks then single-stream blocks (57 for FLUX.1-dev, numbered 0…56)."""
        return len(self.transformer.transformer_blocks) + len(self.transformer.single_transformer_blocks)

    @property
    def image_size(self) -> int:
        """Pixel side of the square input: the VAE config's ``sample_size`` (1024 for FLUX.1-dev)."""
        return self._image_size if self._image_size is not None else int(self.pipe.vae.config.sample_size)

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.image_size // (2 * self.pipe.vae_scale_factor)
        return side, side

    @property
    def num_text_tokens(self) -> int:
        return FLUX_TEXT_TOKENS

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def mu(self) -> float:
        rows, cols = self.token_grid
        return flux_mu(self.pipe.scheduler.config, rows * cols, self.latent_channels, self.mu_from_channels)

    def noising(self, k: int, num_steps: int = FLUX_NUM_STEPS) -> Noising:
        """``timesteps[-k]`` of the Flux schedule: k = 8 of 50 (index 42) is σ = 0.2317 with the official mu bug."""
        return flux_noising(self.pipe.scheduler, k, num_steps, self.mu)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] at ``image_size`` → normalised VAE posterior means [B, 16, h, w]."""
        pixels = 2 * images - 1 if self.scale_to_unit_range else images
        return encode_normalised_latents(self.pipe.vae, pixels, self.device)

    def noise_latents(self, latents: torch.Tensor, noising: Noising, seeds: list[int]) -> torch.Tensor:
        """x_t = (1 − σ)·z + σ·ε with ε drawn per image from its own seed (the stock ``scale_noise``)."""
        _set_flux_timesteps(self.pipe.scheduler, noising.num_steps, self.mu)
        return noise_latents_per_image(self.pipe.scheduler, latents, noising.index, seeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 token states [B, 77, D] (``</s>`` and ``<pad>`` included) and CLIP-L pooled output [B, 768]."""
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=FLUX_TEXT_TOKENS,
        )
        return prompt_embeds.to(self.dtype), pooled.to(self.dtype)

    def transformer_inputs(
        self, noisy_latents: torch.Tensor, noising: Noising, prompt_embeds: torch.Tensor, pooled: torch.Tensor
    ) -> dict:
        """The keyword arguments `FluxPipeline` gives its transformer, for unpacked latents [B, C, h, w]."""
        batch, channels, height, width = noisy_latents.shape
        latents = noisy_latents.to(self.device, self.dtype)
        packed = self.pipe._pack_latents(latents, batch, channels, height, width)
        img_ids = self.pipe._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        timestep = torch.full((batch,), noising.timestep, device=self.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([batch], self.guidance_scale, device=self.device, dtype=torch.float32)
        return {
            "hidden_states": packed,
            "timestep": timestep / 1000,
            "guidance": guidance,
            "pooled_projections": pooled.to(self.device, self.dtype),
            "encoder_hidden_states": prompt_embeds.to(self.device, self.dtype),
            "txt_ids": txt_ids,
            "img_ids": img_ids,
            "return_dict": False,
        }

    @torch.no_grad()
    def forward(
        self, noisy_latents: torch.Tensor, noising: Noising, prompt_embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One transformer forward; returns the velocity prediction unpacked to [B, C, h, w]."""
        _, _, height, width = noisy_latents.shape
        prediction = self.transformer(**self.transformer_inputs(noisy_latents, noising, prompt_embeds, pooled))[0]
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(prediction, height * factor, width * factor, factor)
