"""Colour naming of generated toy images (toy-shapes, whose classes have one colour each, and the toy world, whose
captions name the colours), the generation/figure plumbing, and the committed toy model's colours."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from seg4diff_repro.datasets import SegmentationDataset, generate_toy_shapes
from seg4diff_repro.datasets.toy_shapes import TOY_CLASSES
from seg4diff_repro.datasets.toy_world import COLOURS, generate_toy_world
from seg4diff_repro.generation.toy_samples import (
    caption_colours,
    dominant_colour_name,
    generate_toy_samples,
    write_toy_generations_csv,
    write_toy_generations_figure,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED_MODEL = REPO / "models" / "toy_sd3"
RGB = {c.colour_name: c.rgb for c in TOY_CLASSES}


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default toy-shapes val split (seed 0, 64 images), generated the way `prepare_toy_shapes` does."""
    root = tmp_path_factory.mktemp("data") / "toy_shapes"
    generate_toy_shapes(root, n_train=1, n_val=64, seed=0)
    return root


@pytest.fixture(scope="module")
def world_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default run's toy_world_objects val split (seed 0, 64 images), as rule prepare_toy_world draws it."""
    root = tmp_path_factory.mktemp("data") / "toy_world_objects"
    generate_toy_world(root, preset="objects", n_train=1, n_val=64, seed=0)
    return root


def _canvas(size: int = 64, grey: int = 220) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (grey, grey - 4, grey - 8))
    return image, ImageDraw.Draw(image)


def test_largest_region_wins() -> None:
    image, draw = _canvas()
    draw.ellipse([2, 2, 40, 40], fill=RGB["red"])  # ~1130 px
    draw.rectangle([46, 46, 62, 62], fill=RGB["blue"])  # 289 px
    assert dominant_colour_name(np.asarray(image)) == "red"

    image, draw = _canvas()
    draw.rectangle([10, 10, 60, 60], fill=RGB["blue"])
    draw.ellipse([0, 0, 20, 20], fill=RGB["red"])
    assert dominant_colour_name(np.asarray(image)) == "blue"


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow"])
def test_each_toy_colour_is_named(colour: str) -> None:
    image, draw = _canvas()
    draw.polygon([(32, 4), (60, 58), (4, 58)], fill=RGB[colour])
    assert dominant_colour_name(np.asarray(image)) == colour


def test_region_size_not_total_pixels() -> None:
    """Many small red dots (more red pixels in all) lose against one larger green shape."""
    image, draw = _canvas()
    for x in range(0, 64, 8):
        for y in range(0, 24, 8):
            draw.rectangle([x, y, x + 4, y + 4], fill=RGB["red"])  # 24 dots of 25 px = 600 px
    draw.rectangle([10, 34, 40, 50], fill=RGB["green"])  # 527 px in one region
    assert dominant_colour_name(np.asarray(image)) == "green"


def test_background_and_off_palette_colours_are_none() -> None:
    image, draw = _canvas()
    assert dominant_colour_name(np.asarray(image)) == "none"
    draw.ellipse([0, 0, 3, 3], fill=RGB["red"])  # below the minimum region size
    draw.rectangle([20, 20, 60, 60], fill=(60, 200, 200))  # cyan: between the hue bins
    draw.rectangle([0, 40, 15, 63], fill=(110, 110, 110))  # dark grey: unsaturated
    assert dominant_colour_name(np.asarray(image)) == "none"


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dominant_colour_name(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dominant_colour_name(np.zeros((8, 8, 3), dtype=np.float32))


def test_real_toy_images_are_named_by_their_caption(toy_val: Path) -> None:
    """Reference: on every real val image the named colour is one of the caption's; for one shape, its colour."""
    dataset = SegmentationDataset(toy_val, "val")
    singles = 0
    for sample in dataset:
        colours = caption_colours(sample.caption)
        name = dominant_colour_name(sample.image)
        assert name in colours, (sample.image_id, sample.caption, name)
        singles += len(colours) == 1
    assert singles >= 10


@pytest.mark.parametrize("colour", list(COLOURS))
def test_each_toy_world_colour_is_named(colour: str) -> None:
    image, draw = _canvas()
    draw.rectangle([10, 10, 40, 40], fill=COLOURS[colour])
    assert dominant_colour_name(np.asarray(image)) == colour


def test_real_toy_world_images_are_named_by_their_caption(world_val: Path) -> None:
    """The toy world's objects (any colour, plain, striped or dotted, on a background with clutter): on every real val
    image the named colour is one of the caption's colour words."""
    dataset = SegmentationDataset(world_val, "val")
    singles = 0
    for sample in dataset:
        colours = caption_colours(sample.caption, class_colours=False)
        name = dominant_colour_name(sample.image)
        assert name in colours, (sample.image_id, sample.caption, name)
        singles += len(colours) == 1
    assert singles >= 10


def test_caption_colours() -> None:
    assert caption_colours("a red circle, a green triangle and a blue square") == ("red", "green", "blue")
    assert caption_colours("circle square") == ("red", "blue")
    assert caption_colours("star") == ("yellow",)
    assert caption_colours("a photo") == ()
    # the toy world: colour words only (its classes have no colour of their own)
    assert caption_colours("a striped purple circle and an orange star on grass and water", class_colours=False) == (
        "purple", "orange")
    assert caption_colours("circle square", class_colours=False) == ()


def test_toy_world_generations_are_from_captions_only(world_val: Path) -> None:
    """For the toy world the default prompt kinds are the caption only: a class-name prompt names no colour there."""
    from seg4diff_repro.models.tiny import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(seed=0)
    records = generate_toy_samples(pipe, world_val, n=2, seed=5, num_inference_steps=2, guidance_scale=2.0)
    assert [(r.image_id, r.prompt_kind) for r in records] == [("toy_val_00000", "caption"), ("toy_val_00001", "caption")]
    assert all(r.expected_colours == caption_colours(r.prompt, class_colours=False) != () for r in records)


def test_generation_plumbing_with_random_weights(toy_val: Path, tmp_path: Path) -> None:
    """Random weights, 2 steps: checks records, seeding and the figure/CSV writers (not image quality)."""
    from seg4diff_repro.models.tiny import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(seed=0)
    records = generate_toy_samples(pipe, toy_val, n=2, seed=5, num_inference_steps=2, guidance_scale=2.0)
    assert [(r.image_id, r.prompt_kind, r.seed) for r in records] == [
        ("toy_val_00000", "caption", 5),
        ("toy_val_00000", "class names", 5),
        ("toy_val_00001", "caption", 6),
        ("toy_val_00001", "class names", 6),
    ]
    assert all(r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8 for r in records)
    again = generate_toy_samples(pipe, toy_val, n=1, seed=5, num_inference_steps=2, guidance_scale=2.0)
    assert np.array_equal(again[0].image, records[0].image)  # same prompt + seed -> same image

    png, pdf, table = tmp_path / "g.png", tmp_path / "g.pdf", tmp_path / "g.csv"
    write_toy_generations_figure(records, png, pdf, model_name="random")
    write_toy_generations_csv(records, table)
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and rows[1]["prompt"] == records[1].prompt


@pytest.mark.skipif(
    not (COMMITTED_MODEL / "model_index.json").is_file(),
    reason=f"no committed toy model at {COMMITTED_MODEL} (train it: scripts/gpu/train_toy_model.sh, "
    "or `snakemake toy_model --forcerun toy_model`)",
)
def test_committed_model_draws_the_caption_colour(world_val: Path) -> None:
    """Six one-object toy-world val captions (the committed model's world), fixed seeds: the largest region has the
    caption's colour in >= 5 of 6."""
    import torch

    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(COMMITTED_MODEL, torch.float32)
    records = generate_toy_samples(
        pipe, world_val, n=6, seed=0, num_inference_steps=14, single_shape_only=True, prompt_kinds=("caption",)
    )
    assert len(records) == 6
    report = [(r.prompt, r.seed, r.dominant_colour) for r in records]
    print(report)
    assert sum(r.colour_ok for r in records) >= 5, report
