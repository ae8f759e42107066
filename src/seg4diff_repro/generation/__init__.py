"""Image generation with the stock diffusers pipelines: perturbation runs, fidelity scores, toy samples.

The names below are imported on first use, so that light modules of this package (run names, prompt
files) load without torch: the Snakefile reads them when it builds the DAG.
"""

from importlib import import_module

_EXPORTS = {
    name: "seg4diff_repro.generation.toy_samples"
    for name in (
        "COLOUR_NAMES",
        "DEFAULT_GUIDANCE_SCALE",
        "ToyGeneration",
        "caption_colours",
        "dominant_colour_name",
        "generate_images",
        "generate_toy_samples",
        "write_toy_generations_csv",
        "write_toy_generations_figure",
    )
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
