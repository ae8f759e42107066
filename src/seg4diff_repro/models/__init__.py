"""Backbone adapters (one per model family) and the builders of the tiny offline pipelines.

The builders are imported on first use: light modules of this package (image preprocessing) are read by
scoring, table and figure jobs, which should not pay for importing diffusers (about 10 s on a small CPU).
"""

from importlib import import_module
from pathlib import Path

_EXPORTS = {
    "TinySD3Config": "seg4diff_repro.models.tiny_sizes",
    "build_tiny_sd3_pipeline": "seg4diff_repro.models.tiny",
    "write_tiny_sd3_pipeline": "seg4diff_repro.models.tiny",
    "build_sd3_tokenizers": "seg4diff_repro.models.clip_tokenizer",
    "write_clip_tokenizer_files": "seg4diff_repro.models.clip_tokenizer",
}

__all__ = ["download_model", "load_adapter", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def load_adapter(
    backbone: str, source: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
    lora: str | Path | None = None, **options
):
    """The analysis adapter of ``backbone`` ("sd3" for SD3/SD3.5, "flux") loaded from ``source`` (at ``revision``);
    ``lora``: the folder of a trained MAGNET adapter, applied to the transformer right after loading (a model
    variant with `lora: <run>` in the config)."""
    import torch

    if backbone == "sd3":
        from seg4diff_repro.models.sd3 import SD3Adapter

        return SD3Adapter.from_pretrained(source, dtype=getattr(torch, dtype), device=device, revision=revision,
                                          lora=lora, **options)
    if backbone == "flux":
        from seg4diff_repro.models.flux import FluxAdapter

        return FluxAdapter.from_pretrained(
            source, dtype=getattr(torch, dtype), device=device, revision=revision, lora=lora, **options
        )
    raise ValueError(f"unknown backbone {backbone!r}: use 'sd3' (SD3, SD3.5) or 'flux'")


def download_model(backbone: str, source: str, revision: str | None = None) -> dict:
    """Fetch Hugging Face model ``source`` into the local hub cache without loading it, so that the GPU jobs
    read it from disk (a separate job, on a node with internet); return what was fetched."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from seg4diff_repro.models.common import download_pipeline, model_fingerprint
    from seg4diff_repro.progress import log_folder_growth

    if backbone not in ("sd3", "flux"):
        raise ValueError(f"unknown backbone {backbone!r}: use 'sd3' (SD3, SD3.5) or 'flux'")
    # The hub's bars are off in a job's log: the bytes arriving in the model's cache folder are its progress.
    cache_folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=source, repo_type="model")
    with log_folder_growth(cache_folder, desc=f"downloading {source}"):
        if backbone == "sd3":  # the analysis never loads T5 (CLIP-only text, as the official code)
            folder = download_pipeline(StableDiffusion3Pipeline, source, revision, text_encoder_3=None,
                                       tokenizer_3=None)
        else:
            folder = download_pipeline(FluxPipeline, source, revision)
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {
        "source": source,
        "revision": revision,
        "backbone": backbone,
        "snapshot": str(folder),
        "model_fingerprint": model_fingerprint(source, revision),
        "files": len(files),
        "bytes": sum(path.stat().st_size for path in files),
    }
