"""Image generation with the stock diffusers pipeline: the toy world's sample figure and colour checks."""

from seg4diff_repro.generation.toy_samples import (
    COLOUR_NAMES,
    DEFAULT_GUIDANCE_SCALE,
    ToyGeneration,
    caption_colours,
    dominant_colour_name,
    generate_images,
    generate_toy_samples,
    write_toy_generations_csv,
    write_toy_generations_figure,
)

__all__ = [
    "COLOUR_NAMES",
    "DEFAULT_GUIDANCE_SCALE",
    "ToyGeneration",
    "caption_colours",
    "dominant_colour_name",
    "generate_images",
    "generate_toy_samples",
    "write_toy_generations_csv",
    "write_toy_generations_figure",
]
