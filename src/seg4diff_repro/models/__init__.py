"""Model builders: offline CLIP tokenizers and the tiny random-weight SD3-architecture pipeline."""

from seg4diff_repro.models.clip_tokenizer import build_sd3_tokenizers, write_clip_tokenizer_files
from seg4diff_repro.models.tiny import TinySD3Config, build_tiny_sd3_pipeline, write_tiny_sd3_pipeline

__all__ = [
    "TinySD3Config",
    "build_sd3_tokenizers",
    "build_tiny_sd3_pipeline",
    "write_clip_tokenizer_files",
    "write_tiny_sd3_pipeline",
]
