"""Tiny random-weight FLUX.1-architecture pipeline built offline from the real diffusers/transformers classes.

Saved with ``save_pretrained``, it loads through the same ``FluxPipeline.from_pretrained(folder)`` call
as ``black-forest-labs/FLUX.1-dev``: a `FluxTransformer2DModel` (double- and single-stream blocks, RMS
QK norm, 3-axis RoPE, guidance embedding), a 16-channel `AutoencoderKL` with Flux's latent shift and
scale, a `CLIPTextModel` (pooled output only) with the offline CLIP-L tokenizer, a `T5EncoderModel`
(gated-GELU, as T5 v1.1) with the offline T5 tokenizer, and Flux's dynamic-shift flow-matching scheduler.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from seg4diff_repro.models.clip_tokenizer import CLIP_EOS_ID, build_sd3_tokenizers
from seg4diff_repro.models.t5_tokenizer import T5_EOS_ID, T5_PAD_ID, build_t5_tokenizer
from seg4diff_repro.models.tiny import save_pipeline_folder, tiny_clip_text_config, tiny_vae
from seg4diff_repro.models.tiny_sizes import TinyFluxConfig

__all__ = ["TinyFluxConfig", "build_tiny_flux_pipeline", "write_tiny_flux_pipeline"]


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
