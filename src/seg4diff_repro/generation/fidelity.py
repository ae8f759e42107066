"""Image fidelity under perturbation (appendix §B.5, Figs. 5, 7, 10): CLIP-I, CLIP-T and DINO scores.

* CLIP-I: cosine similarity of the CLIP image embeddings of a generated image and its reference;
* CLIP-T: cosine similarity of the CLIP image embedding and the CLIP text embedding of the prompt;
* DINO: cosine similarity of the DINO ViT CLS embeddings of a generated image and its reference.

The reference of an image is the unperturbed image of the same prompt and seed (docs/method.md#fidelity-scores
[assumption]). The paper does not name its backbones; the defaults are DreamBooth's: open_clip
ViT-B-32 with OpenAI's weights and DINO ViT-S/16 (``facebook/dino-vits16``) [assumption]. Every score
row records the generating model's fingerprint (from the run's manifest) and the backbones and weights it came
from, each by fingerprint too (a hub commit, resolved when the configured revision is null, or a content hash).

``weights="random"`` builds the same architectures untrained (seeded), so the toy world runs offline;
its scores only show that the pipeline runs, so it is refused for any model that is not a toy model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DINO_VITS16_CONFIG",
    "DINO_VITS16_PREPROCESSOR",
    "FidelityScorer",
    "FidelitySettings",
    "RandomWeightsRefused",
    "check_weights_allowed",
    "score_run",
]

log = logging.getLogger(__name__)

DEFAULT_DINO = "facebook/dino-vits16"
# config.json and preprocessor_config.json of facebook/dino-vits16: the architecture that random weights
# get when the source is the hub id (offline), and its preprocessing (resize to 224, ImageNet statistics).
DINO_VITS16_CONFIG = {
    "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
    "patch_size": 16, "image_size": 224, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
}
DINO_VITS16_PREPROCESSOR = {
    "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


class RandomWeightsRefused(ValueError):
    """Random-weight fidelity backbones were asked for on a model that is not a toy model."""


@dataclass(frozen=True)
class FidelitySettings:
    """Which CLIP and DINO backbones score the images (config ``analyses.generation.fidelity``)."""

    weights: str = "pretrained"  # "pretrained" (the weights below) or "random" (toy models only)
    clip_arch: str = "ViT-B-32"  # an open_clip architecture name
    clip_pretrained: str = "openai"  # an open_clip pretrained tag, or a local checkpoint file
    clip_revision: str | None = None  # hub commit of the tag's weights (None: the newest)
    dino_source: str = DEFAULT_DINO  # a Hugging Face id, or a local save_pretrained folder of a ViTModel
    dino_revision: str | None = None  # hub commit of dino_source (None: the newest)
    seed: int = 0  # initialisation seed of random weights
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"weights={self.weights!r}: use 'pretrained' or 'random'")


def check_weights_allowed(settings: FidelitySettings, model: str, toy_model: bool) -> None:
    """Refuse random-weight backbones for a model that is not marked ``toy: true``."""
    if settings.weights == "random" and not toy_model:
        raise RandomWeightsRefused(
            f"random-weight CLIP/DINO scores are allowed for toy models only, and {model!r} is not one "
            f"(models.{model}.toy is not true): they would say nothing about a real model. Set "
            "analyses.generation.fidelity.weights: pretrained, which loads CLIP "
            f"{settings.clip_arch} '{settings.clip_pretrained}' and DINO {settings.dino_source} (needs the network "
            "once, or local copies: fidelity.clip_pretrained = a checkpoint file, fidelity.dino_source = a "
            "save_pretrained folder)."
        )


def _snapshot_commit(path: str | Path) -> str | None:
    """The commit of a file in the Hugging Face cache (``.../snapshots/<commit>/<file>``), None elsewhere."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's CPU RNG seeded with ``seed`` inside the block (and restored after), so random weights repeat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FidelityScorer:
    """CLIP (open_clip) and DINO (transformers ViT) embeddings and the three fidelity scores."""

    def __init__(self, settings: FidelitySettings = FidelitySettings(), *, toy_model: bool = False,
                 model: str = "the evaluated model", device: str | torch.device = "cpu"):
        check_weights_allowed(settings, model, toy_model)
        self.settings = settings
        self.device = torch.device(device)
        self._load_clip()
        self._load_dino()

    # --- loading ------------------------------------------------------------------------------------

    def _load_clip(self) -> None:
        import open_clip

        s = self.settings
        tag = open_clip.get_pretrained_cfg(s.clip_arch, s.clip_pretrained)  # {} for a file
        # OpenAI's CLIP weights use QuickGELU, which the plain "ViT-B-32" config lacks: take it from the tag.
        quick_gelu = bool(tag.get("quick_gelu", False))
        pretrained = s.clip_pretrained if s.weights == "pretrained" else None
        if pretrained is not None and not tag and not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"fidelity.clip_pretrained = {pretrained!r} is neither an open_clip tag of {s.clip_arch} "
                f"(tags: {open_clip.list_pretrained_tags_by_model(s.clip_arch)}) nor a checkpoint file"
            )
        preprocessing, hub_commit = {}, None
        if pretrained is not None and tag:
            # Fetch the tag's weights ourselves, at the pinned commit (open_clip would take the newest) or, with
            # clip_revision null, the newest, so that the file's snapshot folder tells which commit was used; keep
            # the tag's preprocessing, which a checkpoint file would not carry.
            repo, filename = os.path.split(tag["hf_hub"])
            from open_clip.pretrained import download_pretrained_from_hf

            pretrained = download_pretrained_from_hf(repo, filename or None, revision=s.clip_revision)
            hub_commit = _snapshot_commit(pretrained)
            names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                     "resize_mode": "image_resize_mode"}
            preprocessing = {argument: tag[key] for key, argument in names.items() if key in tag}
        try:
            with _seeded(s.seed):
                model, _, self.clip_preprocess = open_clip.create_model_and_transforms(
                    s.clip_arch, pretrained=pretrained, force_quick_gelu=quick_gelu, **preprocessing
                )
        except RuntimeError as error:
            raise RuntimeError(
                f"could not load CLIP {s.clip_arch} '{pretrained}': {error}. Without network access, download "
                "the checkpoint elsewhere and set analyses.generation.fidelity.clip_pretrained to its file."
            ) from error
        self.clip = model.to(self.device).eval()
        self.clip_tokenizer = open_clip.get_tokenizer(s.clip_arch)
        weights = "random weights" if pretrained is None else f"'{s.clip_pretrained}'"
        if hub_commit is not None:
            weights += f" at {tag['hf_hub'].rstrip('/')}@{hub_commit}"
        self.clip_name = f"open_clip {s.clip_arch}{' (QuickGELU)' if quick_gelu else ''}, {weights}"
        # What the weights are: the hub commit the file came from, else the file's bytes (random: none).
        if hub_commit is not None:
            self.clip_fingerprint = f"hub:{os.path.split(tag['hf_hub'])[0]}@{hub_commit}"
        elif pretrained is not None:
            from seg4diff_repro.models.common import FileHashes

            hashes = FileHashes()
            self.clip_fingerprint = f"sha256:{hashes.sha256(Path(pretrained))}"
            hashes.save()
        else:
            self.clip_fingerprint = None

    def _load_dino(self) -> None:
        from transformers import AutoImageProcessor, ViTConfig, ViTImageProcessor, ViTModel

        source = self.settings.dino_source
        local = Path(source).is_dir()
        if self.settings.weights == "random":
            if local:
                config = ViTConfig.from_pretrained(source)
                self.dino_processor = AutoImageProcessor.from_pretrained(source)
            elif source == DEFAULT_DINO:
                config = ViTConfig(**DINO_VITS16_CONFIG)
                self.dino_processor = ViTImageProcessor(**DINO_VITS16_PREPROCESSOR)
            else:
                raise ValueError(
                    f"random DINO weights need the architecture of {source!r}, which is not known offline: "
                    f"use {DEFAULT_DINO} or a local folder with its config.json"
                )
            with _seeded(self.settings.seed + 1):
                model = ViTModel(config, add_pooling_layer=False)
            self.dino_name = f"{source} architecture, random weights"
            self.dino_fingerprint = None
        else:
            try:
                revision = {} if self.settings.dino_revision is None else {"revision": self.settings.dino_revision}
                model = ViTModel.from_pretrained(source, add_pooling_layer=False, **revision)
                self.dino_processor = AutoImageProcessor.from_pretrained(source, **revision)
            except OSError as error:
                raise OSError(
                    f"could not load DINO {source!r}: {error}. Without network access, save it elsewhere with "
                    "save_pretrained (model and image processor) and set analyses.generation.fidelity.dino_source "
                    "to that folder."
                ) from error
            from seg4diff_repro.models.common import model_fingerprint

            # A local folder by content; a hub id by the commit loading resolved (dino_revision null: the newest).
            self.dino_fingerprint = model_fingerprint(source, self.settings.dino_revision, marker="config.json")
            self.dino_name = str(source) + ("" if local else "@" + self.dino_fingerprint.rsplit("@", 1)[1])
        self.dino = model.to(self.device).eval()

    @property
    def backbones(self) -> dict[str, str]:
        """What produced the scores, recorded beside every score."""
        return {"clip_backbone": self.clip_name, "dino_backbone": self.dino_name,
                "fidelity_weights": self.settings.weights, "clip_fingerprint": self.clip_fingerprint,
                "dino_fingerprint": self.dino_fingerprint}

    # --- embeddings (unit length) -------------------------------------------------------------------

    def _batches(self, items: Sequence):
        for start in range(0, len(items), self.settings.batch_size):
            yield items[start : start + self.settings.batch_size]

    @torch.no_grad()
    def clip_image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = torch.stack([self.clip_preprocess(Image.fromarray(image)) for image in batch])
            out.append(self.clip.encode_image(pixels.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def clip_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        out = [self.clip.encode_text(self.clip_tokenizer(list(batch)).to(self.device)).float()
               for batch in self._batches(prompts)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def dino_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = self.dino_processor(images=[Image.fromarray(image) for image in batch], return_tensors="pt")
            hidden = self.dino(pixel_values=pixels["pixel_values"].to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float())  # the CLS token
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    # --- scores -------------------------------------------------------------------------------------

    def score(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray],
              prompts: Sequence[str]) -> list[dict[str, float]]:
        """CLIP-I, CLIP-T and DINO of each image against its reference and its prompt."""
        if not len(images) == len(references) == len(prompts):
            raise ValueError(f"got {len(images)} images, {len(references)} references and {len(prompts)} prompts")
        clip, clip_ref = self.clip_image_embeddings(images), self.clip_image_embeddings(references)
        text = self.clip_text_embeddings(prompts)
        dino, dino_ref = self.dino_embeddings(images), self.dino_embeddings(references)
        pairs = ((clip, clip_ref), (clip, text), (dino, dino_ref))
        clip_i, clip_t, dino_s = ((a * b).sum(-1).tolist() for a, b in pairs)
        return [{"clip_i": i, "clip_t": t, "dino": d} for i, t, d in zip(clip_i, clip_t, dino_s)]


def score_run(run_dir: str | Path, reference_dir: str | Path, scorer: FidelityScorer):
    """One row per image of a generation run: its scores against the reference image of the same prompt and seed,
    with the backbones and the code (version, fingerprint, commit) that scored it."""
    import pandas as pd

    from seg4diff_repro.generation.runs import read_run
    from seg4diff_repro.provenance import provenance, provenance_label

    manifest, images = read_run(run_dir)
    reference_manifest, references = read_run(reference_dir)
    key = [(e["prompt"], e["seed"]) for e in manifest["images"]]
    if key != [(e["prompt"], e["seed"]) for e in reference_manifest["images"]]:
        raise ValueError(f"{run_dir} and its reference {reference_dir} do not hold the same (prompt, seed) images")
    scores = scorer.score(images, references, [prompt for prompt, _ in key])
    run = manifest["run"]
    code_version = provenance_label(provenance())  # score-fidelity runs the whole package's code
    rows = [
        {"model": run["model"], "run": run["run"], "mode": manifest["mode"], "layer": manifest["layer"],
         "prompt_index": entry["prompt_index"], "prompt": entry["prompt"], "seed": entry["seed"], **score,
         # the generating model, as the run's manifest recorded it, then the scoring backbones
         "model_source": run["source"], "model_revision": run["revision"],
         "model_fingerprint": manifest["model_fingerprint"], **scorer.backbones, "code_version": code_version}
        for entry, score in zip(manifest["images"], scores)
    ]
    log.info("scored %d images of %s against %s", len(rows), run_dir, reference_dir)
    return pd.DataFrame(rows)
