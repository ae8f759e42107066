"""Random-weight pipelines at the released configurations of SD3-medium, SD3.5-medium and FLUX.1-dev.

Speed and memory do not depend on the weights, so these stand in for the gated hub checkpoints in the rehearsal
of the paper run (`configs/rehearsal.yaml`) and in the GPU benchmarks. Every component has the size of the
released one (the config.json of each hub folder): the MM-DiT transformer, the 16-channel VAE, CLIP-L and
CLIP-G for SD3/SD3.5 (T5 off, as the protocol runs them), CLIP-L and T5-XXL for Flux. Tokenizers are the offline
ones of the toy models (`clip_tokenizer`, `t5_tokenizer`); written with ``save_pretrained``, a folder loads
through the same ``from_pretrained`` call as the hub id.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from seg4diff_repro.models.clip_tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, build_sd3_tokenizers
from seg4diff_repro.models.t5_tokenizer import T5_EOS_ID, T5_PAD_ID, build_t5_tokenizer
from seg4diff_repro.models.tiny import save_pipeline_folder

__all__ = ["RELEASED_TRANSFORMERS", "build_released_random_pipeline", "write_released_random_pipeline"]

# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-medium
# and black-forest-labs/FLUX.1-dev.
RELEASED_TRANSFORMERS = {
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                 dual_attention_layers=tuple(range(13))),
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
}
# vae/config.json: the same architecture for all three, with each model's latent shift and scale.
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
_VAE_NORMALISATION = {"sd3": (0.0609, 1.5305), "sd35": (0.0609, 1.5305), "flux": (0.1159, 0.3611)}
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu")
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               projection_dim=1280, hidden_act="gelu")
# text_encoder_2/config.json of FLUX.1-dev: T5 v1.1 XXL's encoder.
_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", vocab_size=32128,
               layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
               use_cache=False)


def _clip_config(sizes: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=CLIP_BOS_ID,
                          eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID, **sizes)


def build_released_random_pipeline(variant: str, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
                                   seed: int = 0):
    """The pipeline of ``variant`` (sd3, sd35, flux) at its released sizes, random weights drawn on ``device``.

    ``device="meta"`` builds it without memory (for counting parameters).
    """
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if variant not in RELEASED_TRANSFORMERS:
        raise ValueError(f"variant={variant!r}: use one of {sorted(RELEASED_TRANSFORMERS)}")
    with tempfile.TemporaryDirectory(prefix="seg4diff-tokenizers-") as tmp:
        clip_l_tokenizer, clip_g_tokenizer = build_sd3_tokenizers(Path(tmp) / "clip")
        t5_tokenizer = build_t5_tokenizer(Path(tmp) / "t5") if variant == "flux" else None
    shift, scale = _VAE_NORMALISATION[variant]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights drawn in the target dtype, on the device: seconds, not minutes
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            vae = diffusers.AutoencoderKL(**_VAE, shift_factor=shift, scaling_factor=scale)
            if variant == "flux":
                transformer = diffusers.FluxTransformer2DModel(**RELEASED_TRANSFORMERS["flux"])
                clip_l = CLIPTextModel(_clip_config({k: v for k, v in _CLIP_L.items() if k != "projection_dim"}))
                t5 = T5EncoderModel(T5Config(**_T5_XXL, pad_token_id=T5_PAD_ID, eos_token_id=T5_EOS_ID,
                                             decoder_start_token_id=T5_PAD_ID))
            else:
                transformer = diffusers.SD3Transformer2DModel(**RELEASED_TRANSFORMERS[variant])
                clip_l = CLIPTextModelWithProjection(_clip_config(_CLIP_L))
                clip_g = CLIPTextModelWithProjection(_clip_config(_CLIP_G))
    finally:
        torch.set_default_dtype(previous)
    if variant == "flux":
        from seg4diff_repro.models.flux import FLUX_DEV_SCHEDULER_CONFIG

        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG), vae=vae,
            text_encoder=clip_l, tokenizer=clip_l_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=clip_l, tokenizer=clip_l_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_g_tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def write_released_random_pipeline(out_dir: Path, variant: str, *, dtype: str = "float16", device: str = "cpu",
                                   seed: int = 0) -> Path:
    """Build ``variant`` with random weights and ``save_pretrained`` it into ``out_dir`` (atomically)."""
    pipe = build_released_random_pipeline(variant, dtype=getattr(torch, dtype), device=device, seed=seed)
    pipe.to("cpu")  # safetensors writes host tensors
    info = {"kind": "released-random", "variant": variant, "seed": seed, "dtype": dtype,
            "note": "random weights at the released configuration (speed and memory only)"}
    path = save_pipeline_folder(pipe, Path(out_dir), info)
    json.loads((path / "model_index.json").read_text())  # written and readable
    return path
