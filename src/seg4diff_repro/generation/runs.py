"""One generation run of the appendix's generation analyses: a folder of PNG images and a JSON manifest.

A run is one model with one setting for every (prompt, seed) pair of a prompt set: unperturbed
("none"), with the I2T attention of one layer blurred ("perturb_l<layer>", Figs. 5, 7, 10, 18), or with
perturbed-I2T guidance at one layer ("guidance_l<layer>", Fig. 19). Each run is its own Snakemake job,
so the layers of a sweep spread over GPUs. A MAGNET-fine-tuned model (``lora``: its adapter folder) is the
base pipeline with the trained LoRA applied right after loading (Fig. 20, Table 3).
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from seg4diff_repro.atomic import replace_folder_atomically
from seg4diff_repro.generation.prompts import figure_prompts, load_prompts
from seg4diff_repro.provenance import provenance

if TYPE_CHECKING:
    from seg4diff_repro.generation.sampling import SamplingSettings

__all__ = [
    "GenerationRun", "RUN_PATTERN", "generation_model_fingerprint", "parse_run", "read_run",
    "run_generation",
]

log = logging.getLogger(__name__)

RUN_PATTERN = r"none|perturb_l[0-9]+|guidance_l[0-9]+"
MANIFEST = "manifest.json"


def parse_run(run: str) -> tuple[str, int | None]:
    """``"none"`` → ("none", None); ``"perturb_l9"`` → ("perturb", 9); ``"guidance_l9"`` → ("guidance", 9)."""
    if not re.fullmatch(RUN_PATTERN, run):
        raise ValueError(f"run {run!r}: use 'none', 'perturb_l<layer>' or 'guidance_l<layer>'")
    if run == "none":
        return "none", None
    mode, layer = run.split("_l")
    return mode, int(layer)


@dataclass(frozen=True)
class GenerationRun:
    """Everything that determines a run's images (the rule passes it as JSON)."""

    model: str
    backbone: str
    source: str
    run: str
    seeds: list[int]
    dtype: str = "float32"
    device: str = "cpu"
    # Prompts: an appendix figure's caption prompts (``figure``), else a file (None: DrawBench 50); the first n.
    figure: str | None = None
    prompts_file: str | None = None
    n_prompts: int | None = None
    steps: int = 28
    cfg: float = 7.5
    guidance_scale: float = 3.0
    blur_sigma: float = 9.0
    blur_kernel: int = 5
    max_sequence_length: int = 77
    distilled_guidance: float = 3.5
    batch_size: int = 4
    revision: str | None = None  # the hub commit of `source` (None: a local folder, or the newest)
    lora: str | None = None  # a MAGNET adapter folder (results/magnet/<run>/adapter) applied after loading
    prompts_list: list[str] | None = None  # the prompts themselves (a config's inline prompt set), else as above

    @classmethod
    def from_json(cls, text: str) -> GenerationRun:
        return cls(**json.loads(text))

    def prompts(self) -> list[str]:
        if self.figure is not None:
            return figure_prompts(self.figure)[: self.n_prompts]
        if self.prompts_list is not None:
            return list(self.prompts_list[: self.n_prompts])
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            raise FileNotFoundError(
                f"the prompts file {self.prompts_file} of {self.model}'s run does not exist: write the prompt set "
                "there, one prompt per line (the paper's Table 3 lists are not published: README, main Table 3)"
            )
        return load_prompts(self.prompts_file, self.n_prompts)

    def sampling(self) -> SamplingSettings:
        from seg4diff_repro.generation.sampling import SamplingSettings  # torch: not needed to build the DAG

        mode, layer = parse_run(self.run)
        return SamplingSettings(
            steps=self.steps, cfg=self.cfg, guidance_scale=self.guidance_scale, blur_sigma=self.blur_sigma,
            blur_kernel=self.blur_kernel, max_sequence_length=self.max_sequence_length,
            distilled_guidance=self.distilled_guidance,
            perturb_layers=(layer,) if mode == "perturb" else (),
            guidance_layers=(layer,) if mode == "guidance" else (),
        )


def _load_pipeline(run: GenerationRun) -> tuple[object, dict | None]:
    """The pipeline of ``run``'s model and, for a MAGNET variant, its adapter's ``adapter.json`` (else None)."""
    import torch

    from seg4diff_repro.models.flux import load_flux_pipeline
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    load = load_flux_pipeline if run.backbone == "flux" else load_sd3_pipeline
    pipe = load(run.source, getattr(torch, run.dtype), run.revision).to(run.device)
    adapter = None
    if run.lora is not None:  # LoRA only, no conv head: the official evaluation
        from seg4diff_repro.magnet.lora import apply_lora

        adapter = apply_lora(pipe.transformer, run.lora)
    pipe.transformer.eval().requires_grad_(False)
    return pipe, adapter


def generation_model_fingerprint(run: GenerationRun) -> str:
    """The base model's fingerprint, joined by the adapter folder's content hash for a MAGNET variant, so that a
    retrained adapter is a different model wherever runs are compared or cached."""
    from seg4diff_repro.models.common import model_fingerprint

    return model_fingerprint(run.source, run.revision, lora=run.lora)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")  # no time stamps: identical bytes on a re-run
    return buffer.getvalue()


def run_generation(run: GenerationRun, out_dir: str | Path) -> dict:
    """Generate every (prompt, seed) image of ``run`` into ``out_dir`` (replaced atomically); return the manifest."""
    from seg4diff_repro.generation.sampling import sample_images, truncated_prompts

    pipe, adapter = _load_pipeline(run)
    prompts = run.prompts()
    pairs = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in run.seeds]
    settings = run.sampling()
    mode, layer = parse_run(run.run)
    num_layers = len(pipe.transformer.transformer_blocks)  # Flux: the double-stream (MM-DiT) blocks
    if layer is not None and layer >= num_layers:
        raise ValueError(f"layer {layer} is out of range for {run.model}: joint layers 0..{num_layers - 1}")
    log.info("%s %s: %d prompts x %d seeds", run.model, run.run, len(prompts), len(run.seeds))
    truncated = truncated_prompts(pipe, prompts, settings.max_sequence_length)
    images = sample_images(pipe, [p for _, p, _ in pairs], [s for *_, s in pairs], settings, batch_size=run.batch_size)
    height, width = images[0].shape[:2]
    manifest = {
        "run": asdict(run),
        "mode": mode,
        "layer": layer,
        "sampling": asdict(settings),
        "height": height,
        "width": width,
        "n_prompts": len(prompts),
        "truncated_prompts": truncated,
        "model_fingerprint": generation_model_fingerprint(run),
        # A MAGNET variant's adapter: which training run and checkpoint, on which base model (adapter.json).
        "adapter": None if adapter is None else {key: adapter.get(key) for key in
                                                 ("run", "protocol", "lora", "base_model", "checkpoint", "seed")},
        "provenance": provenance("generation"),
        "images": [
            {"file": f"p{index:03d}_s{seed}.png", "prompt_index": index, "prompt": prompt, "seed": seed}
            for index, prompt, seed in pairs
        ],
    }
    with replace_folder_atomically(out_dir) as staging:
        for entry, image in zip(manifest["images"], images):
            (staging / entry["file"]).write_bytes(_png_bytes(image))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def read_run(folder: str | Path) -> tuple[dict, list[np.ndarray]]:
    """A run's manifest and its images (HxWx3 uint8, in manifest order)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    images = [np.asarray(Image.open(folder / entry["file"]).convert("RGB")) for entry in manifest["images"]]
    return manifest, images
