"""CLIPScore of generated images (main Table 3: baseline vs the MAGNET-fine-tuned models).

The paper names neither the CLIP backbone nor the scaling of its CLIPScore; its values (26-28) fit
100 · max(cos, 0) with CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), torchmetrics' ``CLIPScore``
default [assumption]. This module computes exactly what torchmetrics computes for one image and its prompt
(the same processor call, the text cut after the model's 77 positions as torchmetrics cuts it, the
projected embeddings, 100 × their cosine; tests/test_magnet_generation.py compares the two on the same
weights), clamped at 0 per image as the metric's definition (Hessel et al.) says. torchmetrics' module
clamps the batch mean instead: the two agree whenever every cosine is positive, as it is for real CLIP on
real images (26-28 means cosines near 0.27).

``weights="random"`` builds the ViT-L/14 architecture untrained (seeded) with the CLIP tokenizer made
offline from open_clip's BPE, so that the toy world runs offline, like the fidelity scorers; it is refused
for any model that is not a toy model.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLIPSCORE_SCALE", "CLIP_VIT_L14_CONFIG", "ClipScoreSettings", "ClipScorer", "offline_clip_processor",
    "score_clipscore_runs",
]

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "openai/clip-vit-large-patch14"
CLIPSCORE_SCALE = "100 · max(cos, 0) per image, mean over images (torchmetrics' CLIPScore scaling [assumption])"
# The text and vision towers of openai/clip-vit-large-patch14 (its config.json): the architecture random weights
# get offline. Its text config keeps the legacy eos_token_id 2, with which transformers pools the text at the
# highest token id (<eos>, 49407, on an uncut prompt), as it does for the hub weights.
CLIP_VIT_L14_CONFIG = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                    "projection_dim": 768, "hidden_act": "quick_gelu", "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768,
                      "hidden_act": "quick_gelu"},
    "projection_dim": 768,
}


@dataclass(frozen=True)
class ClipScoreSettings:
    """Which CLIP scores the images (config ``analyses.generation.clipscore``, without prompt sets and device)."""

    weights: str = "pretrained"  # "pretrained" (source at revision) or "random" (toy models only)
    source: str = DEFAULT_SOURCE  # a Hugging Face id or a local save_pretrained folder (model and processor)
    revision: str | None = None  # hub commit of source (None: the newest)
    seed: int = 0  # initialisation seed of random weights
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"clipscore weights={self.weights!r}: use 'pretrained' or 'random'")


def offline_clip_processor():
    """The CLIPProcessor of ``openai/clip-vit-large-patch14`` built offline: the CLIP tokenizer from open_clip's BPE
    (padding with <|endoftext|>) and the image processor's defaults, which are OpenAI's (shorter side to 224,
    bicubic; centre crop 224; CLIP mean and std)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from seg4diff_repro.models.clip_tokenizer import EOS_TOKEN, write_clip_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=EOS_TOKEN)
    return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


def _random_clip(source: str, seed: int):
    """CLIPModel of ``source``'s architecture with seeded random weights, and its processor (built offline)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    if Path(source).is_dir():
        config = CLIPConfig.from_pretrained(source)
        processor = CLIPProcessor.from_pretrained(source)
    elif source == DEFAULT_SOURCE:
        config = CLIPConfig(**CLIP_VIT_L14_CONFIG)
        processor = offline_clip_processor()
    else:
        raise ValueError(f"random CLIPScore weights need the architecture of {source!r}, which is not known offline: "
                         f"use {DEFAULT_SOURCE} or a local folder with its config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, processor


def _projected(output) -> torch.Tensor:
    """The projected embeddings of ``get_image_features``/``get_text_features``: a tensor up to transformers 4,
    the ``pooler_output`` of the returned model output from transformers 5 on."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP image and text embeddings (transformers) and the CLIPScore of each (image, prompt) pair."""

    def __init__(self, settings: ClipScoreSettings = ClipScoreSettings(), *, toy_model: bool = False,
                 model: str = "the evaluated model", device: str | torch.device = "cpu", clip=None, processor=None):
        """``clip``, ``processor``: an already loaded CLIPModel and its processor (tests), instead of ``settings``'."""
        if settings.weights == "random" and not toy_model:
            raise ValueError(
                f"random-weight CLIPScore is allowed for toy models only, and {model!r} is not one (its `toy` is not "
                "true): it would say nothing about a real model. Set analyses.generation.clipscore.weights: "
                f"pretrained (loads {settings.source}; needs the network once, or a local save_pretrained folder as "
                "analyses.generation.clipscore.source)."
            )
        self.settings = settings
        self.device = torch.device(device)
        if clip is None:
            clip, processor, self.fingerprint = self._load()
        else:
            self.fingerprint = None
        self.clip, self.processor = clip.to(self.device).eval(), processor
        weights = "random weights" if settings.weights == "random" else (self.fingerprint or "given weights")
        self.backbone = f"transformers CLIPModel {settings.source}, {weights}"

    def _load(self):
        s = self.settings
        if s.weights == "random":
            return (*_random_clip(s.source, s.seed), None)
        from transformers import CLIPModel, CLIPProcessor

        from seg4diff_repro.models.common import model_fingerprint

        revision = {} if s.revision is None else {"revision": s.revision}
        try:
            model = CLIPModel.from_pretrained(s.source, **revision)
            processor = CLIPProcessor.from_pretrained(s.source, **revision)
        except OSError as error:
            raise OSError(
                f"could not load CLIP {s.source!r} for CLIPScore: {error}. Without network access, save it elsewhere "
                "with save_pretrained (model and processor) and set analyses.generation.clipscore.source to that "
                "folder."
            ) from error
        return model, processor, model_fingerprint(s.source, s.revision, marker="config.json")

    def _batches(self, items: Sequence):
        for start in range(0, len(items), self.settings.batch_size):
            yield items[start : start + self.settings.batch_size]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-length embeddings of HxWx3 uint8 images, passed to the processor as torchmetrics passes them
        (CxHxW uint8 tensors)."""
        out = []
        for batch in self._batches(images):
            tensors = [torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) for image in batch]
            pixels = self.processor(images=tensors, return_tensors="pt", padding=True)["pixel_values"]
            out.append(_projected(self.clip.get_image_features(pixels.to(self.device))).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def text_window(self) -> int:
        return int(self.clip.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings of the prompts. A prompt longer than the text window is cut after its first
        positions, as torchmetrics cuts it (no <eos> is put back)."""
        window, out = self.text_window(), []
        for batch in self._batches(prompts):
            tokens = self.processor(text=list(batch), return_tensors="pt", padding=True)
            ids, mask = tokens["input_ids"][:, :window], tokens["attention_mask"][:, :window]
            out.append(_projected(self.clip.get_text_features(ids.to(self.device), mask.to(self.device))).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def cut_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts the text window cuts (more tokens, <sos> and <eos> included, than positions)."""
        window = self.text_window()
        return [p for p in dict.fromkeys(prompts) if len(self.processor.tokenizer(p)["input_ids"]) > window]

    def cosines(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1).cpu().double().numpy()

    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """CLIPScore of each (image, prompt): 100 · max(cos, 0)."""
        return 100 * np.maximum(self.cosines(images, prompts), 0)


def score_clipscore_runs(runs: dict[str, str | Path], scorer: ClipScorer):
    """One row per image of each run folder (``runs``: prompt-set name → folder), with its cosine and CLIPScore,
    the generating model (as the run's manifest recorded it, adapter included), the backbone and the code."""
    import pandas as pd

    from seg4diff_repro.generation.runs import read_run
    from seg4diff_repro.provenance import provenance, provenance_label

    code_version = provenance_label(provenance())
    frames = []
    for prompt_set, folder in runs.items():
        manifest, images = read_run(folder)
        prompts = [entry["prompt"] for entry in manifest["images"]]
        cosines = scorer.cosines(images, prompts)
        cut = set(scorer.cut_prompts(prompts))
        run, adapter = manifest["run"], manifest.get("adapter") or {}
        frames.append(pd.DataFrame({
            "model": run["model"], "prompt_set": prompt_set,
            "prompt_index": [e["prompt_index"] for e in manifest["images"]], "prompt": prompts,
            "seed": [e["seed"] for e in manifest["images"]], "cosine": cosines,
            "clipscore": 100 * np.maximum(cosines, 0), "text_cut": [p in cut for p in prompts],
            "model_source": run["source"], "model_revision": run["revision"], "lora": run.get("lora"),
            "adapter_run": adapter.get("run"), "model_fingerprint": manifest["model_fingerprint"],
            "steps": manifest["sampling"]["steps"], "cfg": manifest["sampling"]["cfg"],
            "width": manifest["width"], "height": manifest["height"],
            "clip_backbone": scorer.backbone, "clip_weights": scorer.settings.weights,
            "clip_fingerprint": scorer.fingerprint, "scaling": CLIPSCORE_SCALE, "code_version": code_version,
        }))
        log.info("CLIPScore of %d images of %s", len(prompts), folder)
    return pd.concat(frames, ignore_index=True)
