"""Tiny random-weight FLUX.1-architecture pipeline built offline from the real diffusers/transformers classes.

Saved with ``save_pretrained``, it loads through the same ``FluxPipeline.from_pretrained(folder)`` call
as ``black-forest-labs/FLUX.1-dev``: a `FluxTransformer2DModel` (double- and single-stream blocks, RMS
QK norm, 3-axis RoPE, guidance embedding), a 16-channel `AutoencoderKL` with Flux's latent shift and
scale, a `CLIPTextModel` (pooled output only) with the offline CLIP-L tokenizer, a `T5EncoderModel`
(gated-GELU, as T5 v1.1) with the offline T5 tokenizer, and Flux's dynamic-shift flow-matching scheduler.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from seg4diff_repro.models.clip_tokenizer import CLIP_EOS_ID, build_sd3_tokenizers
from seg4diff_repro.models.t5_tokenizer import T5_EOS_ID, T5_PAD_ID, build_t5_tokenizer
from seg4diff_repro.models.tiny import (
    raise_on_failed_size_checks,
    save_pipeline_folder,
    tiny_clip_text_config,
    tiny_vae,
)

__all__ = ["TinyFluxConfig", "build_tiny_flux_pipeline", "write_tiny_flux_pipeline"]


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of the tiny Flux pipeline (defaults: 64 px images → 32² latent → 16×16 = 256 packed image tokens)."""

    image_size: int = 64
    # VAE: two blocks -> one downsampling (factor 2); Flux's 16 latent channels and latent normalisation.
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 32
    latent_channels: int = 16
    vae_shift_factor: float = 0.1159
    vae_scaling_factor: float = 0.3611
    # Flux transformer (FLUX.1-dev: 19 + 38 blocks, 24 heads x 128, RoPE axes (16, 56, 56)).
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = True
    # CLIP-L text encoder: only its pooled output (hidden size) is used, as pooled_projections.
    text_hidden_size: int = 32
    text_intermediate_size: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 2
    text_projection_dim: int = 32
    text_hidden_act: str = "quick_gelu"
    # T5 encoder (T5 v1.1 XXL: d_model 4096, gated-gelu); its d_model is the transformer's joint_attention_dim.
    t5_d_model: int = 32
    t5_d_kv: int = 16
    t5_d_ff: int = 64
    t5_num_layers: int = 2
    t5_num_heads: int = 2
    t5_relative_attention_num_buckets: int = 32
    t5_relative_attention_max_distance: int = 128
    # Scheduler: FLUX.1-dev's FlowMatchEulerDiscreteScheduler config.
    num_train_timesteps: int = 1000
    scheduler_shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    def __post_init__(self) -> None:
        """Check the size relations diffusers' Flux pipeline relies on, so mistakes fail here and not mid-run."""
        checks = [
            (
                self.image_size % (2 * self.vae_factor) == 0,
                f"image_size={self.image_size} must be divisible by 2 x VAE factor = {2 * self.vae_factor} "
                "(latents are packed in 2x2 patches)",
            ),
            (
                sum(self.axes_dims_rope) == self.attention_head_dim,
                f"axes_dims_rope={self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}",
            ),
            (
                all(d % 2 == 0 for d in self.axes_dims_rope),
                f"every axes_dims_rope {self.axes_dims_rope} must be even (RoPE rotates pairs of channels)",
            ),
        ]
        raise_on_failed_size_checks(self, checks)


def _t5_encoder(config: TinyFluxConfig, vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=config.t5_d_model,
            d_kv=config.t5_d_kv,
            d_ff=config.t5_d_ff,
            num_layers=config.t5_num_layers,
            num_heads=config.t5_num_heads,
            relative_attention_num_buckets=config.t5_relative_attention_num_buckets,
            relative_attention_max_distance=config.t5_relative_attention_max_distance,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
            pad_token_id=T5_PAD_ID,
            eos_token_id=T5_EOS_ID,
            decoder_start_token_id=T5_PAD_ID,
        )
    )


def build_tiny_flux_pipeline(config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0) -> FluxPipeline:
    """Build a tiny fp32 `FluxPipeline` with random weights drawn from ``seed``."""
    with tempfile.TemporaryDirectory(prefix="seg4diff-tokenizers-") as tmp:
        clip_tokenizer = build_sd3_tokenizers(Path(tmp) / "clip")[0]  # CLIP-L: pads with <|endoftext|>
        t5_tokenizer = build_t5_tokenizer(Path(tmp) / "t5")

    # Re-seeding before every module makes each module's weights depend only on (seed, config).
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,  # 2x2 packed latent patches
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.t5_d_model,
        pooled_projection_dim=config.text_hidden_size,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=config.axes_dims_rope,
    )
    torch.manual_seed(seed)
    vae = tiny_vae(config)
    torch.manual_seed(seed)
    # No projection head: Flux uses CLIP-L's pooled output as pooled_projections.
    text_encoder = CLIPTextModel(tiny_clip_text_config(config, pad_token_id=CLIP_EOS_ID))
    torch.manual_seed(seed)
    text_encoder_2 = _t5_encoder(config, vocab_size=len(t5_tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.num_train_timesteps,
        shift=config.scheduler_shift,
        use_dynamic_shifting=config.use_dynamic_shifting,
        base_shift=config.base_shift,
        max_shift=config.max_shift,
        base_image_seq_len=config.base_image_seq_len,
        max_image_seq_len=config.max_image_seq_len,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.float().eval()  # the toy world is fp32 whatever torch's default dtype
    return pipe


def write_tiny_flux_pipeline(out_dir: Path, config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0) -> Path:
    """Build the tiny Flux pipeline and save it (safetensors) into ``out_dir`` atomically; return ``out_dir``.

    The folder also gets ``seg4diff_model.json`` =
    {"kind": "tiny-random", "backbone": "flux", "seed": ..., "config": ...}.
    """
    pipe = build_tiny_flux_pipeline(config, seed=seed)
    info = {"kind": "tiny-random", "backbone": "flux", "seed": seed, "config": asdict(config)}
    return save_pipeline_folder(pipe, Path(out_dir), info)
