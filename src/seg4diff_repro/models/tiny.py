"""Tiny random-weight SD3-architecture pipeline built offline from the real diffusers/transformers classes.

It is saved with ``save_pretrained`` so the analysis code loads it through exactly the same
``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`` call as
``stabilityai/stable-diffusion-3-medium-diffusers``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from seg4diff_repro.atomic import replace_folder_atomically
from seg4diff_repro.models.clip_tokenizer import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_G_PAD_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    build_sd3_tokenizers,
)
# The sizes live in a module without torch (the config check reads them); imported here under their old home.
from seg4diff_repro.models.tiny_sizes import (
    TINY_SD35_CONFIG,
    TinyFluxConfig,
    TinySD3Config,
    raise_on_failed_size_checks,
)

__all__ = [
    "MODEL_INFO_FILE",
    "TINY_SD35_CONFIG",
    "TinySD3Config",
    "build_tiny_sd3_pipeline",
    "check_replaceable",
    "folder_size_bytes",
    "raise_on_failed_size_checks",
    "save_pipeline_folder",
    "tiny_clip_text_config",
    "tiny_vae",
    "write_tiny_sd3_pipeline",
]

MODEL_INFO_FILE = "seg4diff_model.json"


def tiny_vae(config: TinySD3Config | TinyFluxConfig) -> AutoencoderKL:
    """A random `AutoencoderKL` with ``config``'s sizes and latent normalisation."""
    n_blocks = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        # The pixel size (FLUX.1-dev's VAE config says 1024); the Flux adapter reads the image size from here.
        sample_size=config.image_size,
        scaling_factor=config.vae_scaling_factor,
        shift_factor=config.vae_shift_factor,
        # SD3's and Flux's VAEs have no quant convs; matching them keeps their state-dict layout.
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_clip_text_config(config: TinySD3Config | TinyFluxConfig, pad_token_id: int) -> CLIPTextConfig:
    """The config of a random CLIP text encoder whose special-token ids match the offline CLIP tokenizers."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_num_layers,
        num_attention_heads=config.text_num_heads,
        projection_dim=config.text_projection_dim,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=config.text_hidden_act,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=pad_token_id,
    )


def build_tiny_sd3_pipeline(
    config: TinySD3Config = TinySD3Config(),
    seed: int = 0,
    tokenizer_dir: Path | None = None,
) -> StableDiffusion3Pipeline:
    """Build a tiny fp32 SD3 pipeline with random weights drawn from ``seed`` (no T5: text_encoder_3=None).

    ``tokenizer_dir`` receives the offline CLIP BPE files; by default a temporary folder is used.
    """
    # Re-seeding before every module makes each module's weights depend only on (seed, config),
    # so changing one module's sizes does not reshuffle the others.
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        caption_projection_dim=config.caption_projection_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        pos_embed_max_size=config.pos_embed_max_size,
        qk_norm=config.qk_norm,
        dual_attention_layers=config.dual_attention_layers,
    )
    torch.manual_seed(seed)
    vae = tiny_vae(config)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(config, pad_token_id=CLIP_EOS_ID))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(config, pad_token_id=CLIP_G_PAD_ID))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.num_train_timesteps, shift=config.scheduler_shift
    )
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="seg4diff-clip-bpe-") as tmp:
            tokenizer, tokenizer_2 = build_sd3_tokenizers(Path(tmp))
    else:
        tokenizer, tokenizer_2 = build_sd3_tokenizers(Path(tokenizer_dir))

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        # Modules follow torch's default dtype, which a caller may have changed; the toy world is fp32.
        # nn.Module.float() rather than pipe.to(dtype=...), which logs a spurious diffusers warning.
        module.float().eval()
    return pipe


def _replaceable(folder: Path) -> bool:
    """Only an empty folder or a previous pipeline folder may be replaced, never unrelated user data.

    A previous pipeline folder has model_index.json or our seg4diff_model.json: Snakemake deletes a rule's
    declared output (model_index.json) before it reruns the rule, so the latter must suffice.
    """
    return not any(folder.iterdir()) or any((folder / name).is_file() for name in ("model_index.json", MODEL_INFO_FILE))


def check_replaceable(out_dir: Path) -> None:
    """Raise if writing a pipeline to ``out_dir`` would replace something that is not a pipeline folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; remove it or choose another model folder.")
    if out_dir.is_dir() and not _replaceable(out_dir):
        raise FileExistsError(
            f"{out_dir} is a non-empty folder without model_index.json or {MODEL_INFO_FILE}; refusing to replace "
            "it. Remove it or choose another model folder."
        )


def folder_size_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def save_pipeline_folder(
    pipe: StableDiffusion3Pipeline,
    out_dir: Path,
    info: dict,
    *,
    max_bytes: int | None = None,
    compact_tokenizers: bool = False,
) -> Path:
    """Save ``pipe`` (safetensors) plus ``seg4diff_model.json`` = ``info`` into ``out_dir`` atomically.

    ``out_dir`` ends up either unchanged or the complete new folder: the pipeline is written to a
    sibling temp folder that then replaces it. Only an empty folder or an earlier pipeline folder
    (one with ``model_index.json``) is replaced. With ``max_bytes`` a larger folder is refused
    (ValueError) before it replaces anything. ``compact_tokenizers`` rewrites each ``tokenizer.json``
    without indentation (the same JSON value, 1.7 instead of 3.6 MB per CLIP tokenizer).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    with replace_folder_atomically(out_dir) as tmp_dir:
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        if compact_tokenizers:
            for path in tmp_dir.glob("tokenizer*/tokenizer.json"):
                value = json.loads(path.read_text(encoding="utf-8"))
                path.write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        (tmp_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if max_bytes is not None and (size := folder_size_bytes(tmp_dir)) > max_bytes:
            raise ValueError(
                f"the saved pipeline is {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB; "
                "save it in float16 or make the model smaller"
            )
        # diffusers writes its safetensors with mode 0600; give every file the umask mode our json file got,
        # so a model folder shared between users or containers stays readable.
        file_mode = (tmp_dir / MODEL_INFO_FILE).stat().st_mode & 0o777
        for path in tmp_dir.rglob("*"):
            if path.is_file():
                path.chmod(file_mode)
    return out_dir



def write_tiny_sd3_pipeline(out_dir: Path, config: TinySD3Config = TinySD3Config(), seed: int = 0) -> Path:
    """Build the tiny pipeline and save it (safetensors) into ``out_dir`` atomically; return ``out_dir``.

    The folder also gets ``seg4diff_model.json`` = {"kind": "tiny-random", "seed": ..., "config": ...}.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # refuse before spending time on building
    pipe = build_tiny_sd3_pipeline(config, seed=seed)
    info = {"kind": "tiny-random", "seed": seed, "config": asdict(config)}
    return save_pipeline_folder(pipe, out_dir, info)
