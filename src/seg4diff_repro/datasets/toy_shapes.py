"""toy-shapes: a procedural, seeded segmentation dataset in the common prepared layout.

Each object class has one fixed shape and one fixed colour, so a caption such as
"a red circle and a blue square" fully determines the appearance. This makes the set
learnable by a tiny diffusion transformer and usable as the offline default dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import replace_folder_atomically
from .layout import (
    IMAGE_DIR,
    LABEL_DIR,
    refuse_foreign_folder,
    save_image_jpeg,
    save_label_png,
    write_captions,
    write_classes_json,
    write_manifest,
    write_split,
)


@dataclass(frozen=True)
class ToyClass:
    """One toy object class: label index, shape name, colour word and nominal RGB."""

    index: int
    name: str
    colour_name: str
    rgb: tuple[int, int, int]


TOY_CLASSES: tuple[ToyClass, ...] = (
    ToyClass(1, "circle", "red", (220, 40, 40)),
    ToyClass(2, "square", "blue", (40, 70, 220)),
    ToyClass(3, "triangle", "green", (40, 170, 60)),
    ToyClass(4, "star", "yellow", (235, 205, 40)),
)
TOY_CLASS_NAMES: tuple[str, ...] = ("background", *(c.name for c in TOY_CLASSES))
IGNORE_INDEX = 255

GENERATOR_NAME = "toy_shapes"
_SPLIT_CODES = {"train": 0, "val": 1}
# Drawn area of one shape as a fraction of the image, before occlusion and the ignore band.
_AREA_RANGE = (0.12, 0.24)
# Smallest visible (non-ignore) area per shape, so every object spans several 16x16 tokens.
MIN_VISIBLE_FRACTION = 0.08
_COLOUR_JITTER = 0.04  # relative, per channel
_STAR_INNER_RATIO = 0.5
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class _Shape:
    cls: ToyClass
    cx: float
    cy: float
    rgb: tuple[int, int, int]
    polygon: list[tuple[float, float]] | None  # None for circles
    radius: float


def _regular_vertices(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [
        (cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)
    ]


def _outer_radius(name: str, area: float) -> float:
    """Circumradius giving a shape of the requested area (so all classes are similarly large)."""
    if name == "circle":
        return math.sqrt(area / math.pi)
    if name == "square":  # square inscribed in a circle of radius R has area 2 R^2
        return math.sqrt(area / 2)
    if name == "triangle":  # equilateral: area = 3*sqrt(3)/4 R^2
        return math.sqrt(4 * area / (3 * math.sqrt(3)))
    # 10-vertex star alternating R and k*R: area = 5 * k * R^2 * sin(36 deg)
    return math.sqrt(area / (5 * _STAR_INNER_RATIO * math.sin(math.pi / 5)))


def _sample_shape(rng: np.random.Generator, cls: ToyClass, size: int) -> _Shape:
    area = rng.uniform(*_AREA_RANGE) * size * size
    radius = _outer_radius(cls.name, area)
    # Keep the whole shape inside the image so its drawn area is what we asked for.
    cx, cy = rng.uniform(radius, size - 1 - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    jitter = 1 + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
    r, g, b = (int(v) for v in np.clip(np.round(np.array(cls.rgb) * jitter), 0, 255))
    if cls.name == "circle":
        polygon = None
    elif cls.name == "square":
        polygon = _regular_vertices(cx, cy, [radius] * 4, angle)
    elif cls.name == "triangle":
        polygon = _regular_vertices(cx, cy, [radius] * 3, angle)
    else:
        polygon = _regular_vertices(cx, cy, [radius, radius * _STAR_INNER_RATIO] * 5, angle)
    return _Shape(cls, float(cx), float(cy), (r, g, b), polygon, radius)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Light, low-contrast, smooth noise (float HxWx3)."""
    base = rng.uniform(200, 235) + rng.uniform(-6, 6, size=3)
    coarse = rng.normal(0, 6, size=(3, 8, 8)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR)) for c in coarse], axis=-1
    )
    fine = rng.normal(0, 2, size=(size, size, 3))
    return base + smooth + fine


def _draw(shapes: list[_Shape], background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = background.shape[0]
    image = Image.fromarray(np.clip(np.round(background), 0, 255).astype(np.uint8))
    label = Image.new("L", (size, size), 0)
    draw_img, draw_lbl = ImageDraw.Draw(image), ImageDraw.Draw(label)
    for s in shapes:
        # Same non-anti-aliased primitive on both canvases, so the label map is exact.
        for draw, fill in ((draw_img, s.rgb), (draw_lbl, s.cls.index)):
            if s.polygon is None:
                draw.ellipse([s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius], fill=fill)
            else:
                draw.polygon(s.polygon, fill=fill)
    return np.asarray(image), np.asarray(label)


def _mark_boundaries(label: np.ndarray) -> np.ndarray:
    """Set the 1-pixel inner boundary of every shape region to IGNORE_INDEX (VOC-style)."""
    padded = np.pad(label, 1, mode="edge")  # the image border is not a shape boundary
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    out = label.copy()
    out[differs & (label != 0)] = IGNORE_INDEX
    return out


def _caption(shapes: list[tuple[str, str, float]]) -> str:
    """Caption from (colour_name, class_name, centre_x) triples, listed left to right."""
    parts = [f"a {colour} {name}" for colour, name, _ in sorted(shapes, key=lambda t: t[2])]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _make_sample(
    rng: np.random.Generator, size: int, min_shapes: int, max_shapes: int
) -> tuple[np.ndarray, np.ndarray, str]:
    background = _background(rng, size)
    # Count and classes are drawn once, outside the retry loop, so rejection does not bias
    # the data towards images with fewer shapes; only in the rare case that no placement is found
    # (about one image in several thousand at 64 px) is the last shape dropped.
    n = int(rng.integers(min_shapes, max_shapes + 1))
    chosen = [TOY_CLASSES[i] for i in rng.choice(len(TOY_CLASSES), size=n, replace=False)]
    min_pixels = MIN_VISIBLE_FRACTION * size * size
    while chosen:
        for _ in range(_MAX_ATTEMPTS):
            shapes = [_sample_shape(rng, cls, size) for cls in chosen]
            image, raw = _draw(shapes, background)
            label = _mark_boundaries(raw)
            if all(np.count_nonzero(label == s.cls.index) >= min_pixels for s in shapes):
                caption = _caption([(s.cls.colour_name, s.cls.name, s.cx) for s in shapes])
                return image, label, caption
        chosen = chosen[:-1]
    raise RuntimeError(
        f"could not place a shape with >= {MIN_VISIBLE_FRACTION:.0%} visible area in {_MAX_ATTEMPTS} attempts "
        f"at image_size={size}; use a larger image"
    )


def _check_args(n_train: int, n_val: int, image_size: int, min_shapes: int, max_shapes: int) -> None:
    for name, value, lo in (("n_train", n_train, 0), ("n_val", n_val, 0), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if n_train + n_val == 0:
        raise ValueError("n_train and n_val are both 0; ask for at least one image")
    if not 1 <= min_shapes <= max_shapes <= len(TOY_CLASSES):
        raise ValueError(
            f"need 1 <= min_shapes <= max_shapes <= {len(TOY_CLASSES)} (classes never repeat in an image), "
            f"got min_shapes={min_shapes!r}, max_shapes={max_shapes!r}"
        )


def _our_class_names(names: tuple[str, ...]) -> bool:
    """classes.json names of an earlier output: toy-shapes' own class list."""
    return names == TOY_CLASS_NAMES


def generate_toy_shapes(
    root: str | Path,
    *,
    n_train: int = 512,
    n_val: int = 64,
    image_size: int = 64,
    min_shapes: int = 1,
    max_shapes: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Generate the toy-shapes dataset at ``root`` (deterministic in all arguments); returns the manifest.

    The set is built in a sibling temp folder and moved into place at the end, so ``root``
    is either absent, the previous complete dataset, or the new complete dataset.
    """
    _check_args(n_train, n_val, image_size, min_shapes, max_shapes)
    root = Path(root)
    refuse_foreign_folder(root, GENERATOR_NAME, _our_class_names)  # before the work; checked again before the swap
    with replace_folder_atomically(root) as tmp:
        captions: dict[str, str] = {}
        for split, count in (("train", n_train), ("val", n_val)):
            if count == 0:
                continue
            ids = [f"toy_{split}_{i:05d}" for i in range(count)]
            for i, image_id in enumerate(ids):
                # One stream per image: changing n_train leaves the val images unchanged.
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
                image, label, captions[image_id] = _make_sample(rng, image_size, min_shapes, max_shapes)
                save_image_jpeg(tmp / IMAGE_DIR / f"{image_id}.jpg", image, quality=95)
                save_label_png(tmp / LABEL_DIR / f"{image_id}.png", label)
            write_split(tmp, split, ids)
        write_classes_json(tmp, TOY_CLASS_NAMES, ignore_index=IGNORE_INDEX, background_index=0)
        write_captions(tmp, captions)
        manifest = write_manifest(
            tmp,
            {
                "generator": GENERATOR_NAME,
                "args": {
                    "n_train": n_train,
                    "n_val": n_val,
                    "image_size": image_size,
                    "min_shapes": min_shapes,
                    "max_shapes": max_shapes,
                    "seed": seed,
                },
                "classes": [
                    {"index": c.index, "name": c.name, "colour_name": c.colour_name, "rgb": list(c.rgb)}
                    for c in TOY_CLASSES
                ],
            },
        )
        refuse_foreign_folder(root, GENERATOR_NAME, _our_class_names)
    return manifest
