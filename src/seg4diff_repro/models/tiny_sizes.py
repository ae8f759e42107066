"""Sizes of the tiny offline pipelines (SD3, SD3.5 and Flux layouts), apart from their builders.

The config check reads the tiny models' layer counts from here when the Snakefile is parsed; this module imports
nothing but the standard library, so that parsing the workflow needs no torch, diffusers or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TINY_SD35_CONFIG", "TOY_WORLD_SD3_CONFIG", "TinyFluxConfig", "TinySD3Config", "raise_on_failed_size_checks"]


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of the tiny SD3-architecture pipeline (defaults: 64 px images, 16x16 = 256 image tokens)."""

    image_size: int = 64
    # VAE: two blocks -> one downsampling (factor 2); SD3's latent channels and latent normalisation.
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 32
    latent_channels: int = 16
    vae_shift_factor: float = 0.0609
    vae_scaling_factor: float = 1.5305
    # MM-DiT transformer.
    sample_size: int = 32
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    caption_projection_dim: int = 128
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 64
    pos_embed_max_size: int = 32
    # SD3.5's additions: RMS QK-norm and an image-only attn2 in the first blocks (None / () for SD3).
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    # Each of the two CLIP text encoders (CLIP-L and CLIP-G get the same tiny sizes).
    text_hidden_size: int = 32
    text_intermediate_size: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 2
    text_projection_dim: int = 32
    text_hidden_act: str = "quick_gelu"
    # Scheduler: SD3's FlowMatchEulerDiscreteScheduler config.
    num_train_timesteps: int = 1000
    scheduler_shift: float = 3.0

    def __post_init__(self) -> None:
        """Check the size relations diffusers' SD3 pipeline relies on, so mistakes fail here and not mid-run."""
        vae_factor = 2 ** (len(self.vae_block_out_channels) - 1)
        inner_dim = self.num_attention_heads * self.attention_head_dim
        checks = [
            (
                self.image_size == self.sample_size * vae_factor,
                f"image_size={self.image_size} must equal sample_size={self.sample_size} x VAE factor {vae_factor} "
                f"(2 ** (len(vae_block_out_channels) - 1))",
            ),
            (
                self.sample_size % self.patch_size == 0,
                f"sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}",
            ),
            (
                self.sample_size // self.patch_size <= self.pos_embed_max_size,
                f"pos_embed_max_size={self.pos_embed_max_size} must be >= sample_size / patch_size = "
                f"{self.sample_size // self.patch_size} (diffusers crops the position embedding to the patch grid)",
            ),
            (
                self.caption_projection_dim == inner_dim,
                f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads x "
                f"attention_head_dim = {inner_dim} (text tokens join the image tokens in every block)",
            ),
            (
                2 * self.text_hidden_size == self.joint_attention_dim,
                f"joint_attention_dim={self.joint_attention_dim} must equal 2 x text_hidden_size = "
                f"{2 * self.text_hidden_size} (CLIP-L and CLIP-G token embeddings are concatenated)",
            ),
            (
                2 * self.text_projection_dim == self.pooled_projection_dim,
                f"pooled_projection_dim={self.pooled_projection_dim} must equal 2 x text_projection_dim = "
                f"{2 * self.text_projection_dim} (CLIP-L and CLIP-G pooled embeddings are concatenated)",
            ),
        ]
        raise_on_failed_size_checks(self, checks)


def raise_on_failed_size_checks(config: TinySD3Config | TinyFluxConfig, checks: list[tuple[bool, str]]) -> None:
    """Raise one ValueError naming every failed (ok, message) check: ``checks`` and the shared VAE and CLIP ones."""
    checks = [
        *checks,
        (
            all(c % config.vae_norm_num_groups == 0 for c in config.vae_block_out_channels),
            f"every vae_block_out_channels {config.vae_block_out_channels} must be divisible by "
            f"vae_norm_num_groups={config.vae_norm_num_groups}",
        ),
        (
            config.text_hidden_size % config.text_num_heads == 0,
            f"text_hidden_size={config.text_hidden_size} must be divisible by text_num_heads={config.text_num_heads}",
        ),
    ]
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise ValueError(f"Invalid {type(config).__name__}: " + "; ".join(errors) + ". Fix these sizes.")


# SD3.5-medium's block layout at tiny size: QK-norm everywhere, dual attention in the first half of the blocks.
TINY_SD35_CONFIG = TinySD3Config(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2))

# The harder toy world's model (issue 16: scripts/gpu/train_toy_model.sh trains it on datasets/toy_world.py; the
# build variant toy_world gives its random control; the committed models/toy_sd3 is still the 6-block toy-shapes
# model): 12 joint blocks, so that an expert layer has room to form in the middle of the stack, and patch size 1 on the 32 x 32 latent, so that a token map has
# 32 x 32 positions and the unsupervised merging threshold of 64 x 64 maps (0.1) separates proposals as in the paper.
# One layer per CLIP text encoder: see models/train_toy.py (point 5 of its docstring).
TOY_WORLD_SD3_CONFIG = TinySD3Config(
    patch_size=1, num_layers=12, num_attention_heads=4, attention_head_dim=16, caption_projection_dim=64,
    text_num_layers=1,
)


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
