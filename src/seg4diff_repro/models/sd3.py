"""SD3 / SD3.5 adapter: the Seg4Diff zero-shot forward pass on a `StableDiffusion3Pipeline`.

What it does follows method_spec §A–B (the official code): VAE posterior mean with the model's shift
and scale, noise to a scheduler index ("t = k of N" is ``timesteps[-k]``), CLIP-only text with T5
off (77 zero T5 positions, 154 text tokens), one transformer forward, no classifier-free guidance.
Unlike the official code the noise is seeded per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

HF_LOGIN_HELP = (
    "Accept the model licence at https://huggingface.co/{repo} while logged in, then log in here with "
    "`hf auth login` (or `huggingface-cli login`), or set the HF_TOKEN environment variable to a token "
    "with read access. A local folder written by `save_pretrained` works too: set the model's `source` "
    "to that folder."
)

# The CLIP context length; the zero "T5" block gets the same length, as in the official code.
CLIP_TOKENS = 77


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Noising:
    """Where on the sampling schedule the input is noised: ``k`` steps before the end of ``num_steps``."""

    k: int
    num_steps: int
    index: int
    timestep: float
    sigma: float


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling (``__cause__``, ``__context__``)."""
    chain, todo = [], [error]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo += [current.__cause__, current.__context__]
    return chain


def load_sd3_pipeline(source: str | Path, dtype: torch.dtype = torch.float32):
    """Load a `StableDiffusion3Pipeline` without T5 from a Hugging Face id or a local folder."""
    from diffusers import StableDiffusion3Pipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    source = str(source)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path and not Path(source).exists():
        raise ModelLoadError(
            f"{source} does not exist and is not a Hugging Face id (owner/name): check the model's `source` "
            "(for the toy models, run the rule that builds them, e.g. `snakemake build_tiny_model`)."
        )
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise ModelLoadError(
            f"{source} has no model_index.json: point the model's `source` at a folder written by "
            "`StableDiffusion3Pipeline.save_pretrained` (or a Hugging Face id)."
        )
    try:
        return StableDiffusion3Pipeline.from_pretrained(
            source, text_encoder_3=None, tokenizer_3=None, torch_dtype=dtype
        )
    except OSError as error:
        # diffusers catches the hub's error on its metadata call, retries from the local cache and then
        # raises a plain OSError "from" the hub error, so look through the whole chain.
        chain = _error_chain(error)

        def find(kind):
            return next((e for e in chain if isinstance(e, kind)), None)

        if (cause := find(GatedRepoError)) is not None:
            raise ModelLoadError(f"{source} is a gated model and this machine has no access. "
                                 + HF_LOGIN_HELP.format(repo=source)) from cause
        if (cause := find(RepositoryNotFoundError)) is not None:
            # The hub answers 401 "not found" for gated repositories when no token is sent.
            raise ModelLoadError(f"{source} was not found on the Hugging Face hub or needs a login. "
                                 + HF_LOGIN_HELP.format(repo=source)) from cause
        if (cause := find(OfflineModeIsEnabled)) is not None:
            raise ModelLoadError(
                f"{source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is "
                "on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE and connect to the network once to download it, "
                "set HF_HOME to a cache that has it, or set the model's `source` to a local folder."
            ) from cause
        if (cause := find(LocalEntryNotFoundError)) is not None:
            raise ModelLoadError(
                f"{source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub could "
                "not be reached. Connect to the network once (or set HF_HOME to a cache that has it), "
                "or set the model's `source` to a local folder."
            ) from error
        raise


class SD3Adapter:
    """The Seg4Diff analysis forward pass for SD3-medium, SD3.5-medium and tiny SD3-architecture models."""

    backbone = "sd3"
    image_first = True  # joint sequence order: [image tokens ; text tokens]

    def __init__(self, pipe, device: str | torch.device = "cpu"):
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.transformer = pipe.transformer
        self.dtype = pipe.transformer.dtype
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> SD3Adapter:
        return cls(load_sd3_pipeline(source, dtype), device)

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
        if not 1 <= k <= num_steps:
            raise ValueError(f"timestep k={k} out of range: use 1..{num_steps} (k steps before the end)")
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_steps)
        index = num_steps - k
        return Noising(
            k=k,
            num_steps=num_steps,
            index=index,
            timestep=float(scheduler.timesteps[index]),
            sigma=float(scheduler.sigmas[index]),
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] at ``image_size`` → normalised VAE posterior means."""
        vae = self.pipe.vae
        pixels = (2 * images - 1).to(self.device, vae.dtype)
        mean = vae.encode(pixels).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return (mean - shift) * vae.config.scaling_factor

    def noise_latents(self, latents: torch.Tensor, noising: Noising, seeds: list[int]) -> torch.Tensor:
        """x_t = (1 − σ)·z + σ·ε with ε drawn per image from its own seed (the stock ``scale_noise``)."""
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        ).to(latents.device, latents.dtype)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(noising.num_steps)
        timestep = scheduler.timesteps[noising.index].expand(latents.shape[0])
        return scheduler.scale_noise(latents, timestep, noise)

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


def describe_model_source(source: str | Path) -> dict:
    """Provenance of a model source: the local folder's recorded metadata, or the hub id."""
    info_file = Path(source) / "seg4diff_model.json"
    if info_file.is_file():
        return {"source": str(source), **json.loads(info_file.read_text())}
    return {"source": str(source)}


