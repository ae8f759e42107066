"""toy-world: a harder procedural, seeded segmentation world in the common prepared layout (issue 16).

Unlike toy-shapes (datasets/toy_shapes.py, one colour per class: the committed toy model's world), here
a class is a shape (a "thing": circle, square, ...) or a texture (a "stuff" region: grass, water, ...), never a
colour: every colour of the palette is drawn for every class, and things are plain, striped or dotted, of varied
size and pose. The background of the object scenes is a class of its own (textured, with unlabelled clutter of the
same colours as the things). So no single low-level cue names a class: a model has to compose colour edges into
shapes and texture statistics into regions, which takes depth.

Presets stand in for the real datasets, differing the way they differ (``TOY_PRESETS``):
- ``objects`` (VOC): 1-3 large things on a background;
- ``crowd`` (COCO-Object): 2-5 smaller things on a background, more clutter;
- ``scenes`` (ADE20K, Pascal Context): 2-3 stuff regions and 2-4 things; every pixel a class, no background;
- ``stuff`` (COCO-Stuff, the unsupervised protocol): 2-4 stuff regions and 0-2 things;
- ``mixed``: each image one of the four, in the vocabulary of all classes (the toy model's training set).

Captions name every object left to right with its colour and pattern ("a striped red circle and a blue star"),
then the stuff regions, largest first ("... on grass and water").
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
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

GENERATOR_NAME = "toy_world"
IGNORE_INDEX = 255
BACKGROUND = "background"
THINGS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
STUFF: tuple[str, ...] = ("grass", "water", "brick", "sand")
#: Every class of the toy world, in the ``mixed`` preset's index order.
TOY_CLASS_NAMES: tuple[str, ...] = (BACKGROUND, *THINGS, *STUFF)
#: The palette every class draws its colour from (nominal RGB, jittered per object).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "blue": (45, 75, 210),
    "green": (45, 160, 65),
    "yellow": (225, 195, 45),
    "purple": (135, 60, 170),
    "orange": (230, 125, 35),
}
THING_PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")


@dataclass(frozen=True)
class ToyPreset:
    """How the images of one toy dataset are drawn."""

    name: str
    stands_in_for: str
    things: tuple[int, int]  # min, max objects per image (distinct classes)
    stuff: tuple[int, int]  # min, max stuff regions; (0, 0): a background-class image
    thing_area: tuple[float, float]  # drawn area of one object, as a fraction of the image
    min_visible: float  # smallest visible (non-ignore) area of an object, as a fraction of the image
    clutter: tuple[int, int]  # unlabelled strokes and blobs on the background

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.stuff == (0, 0):
            return (BACKGROUND, *THINGS)
        return (*THINGS, *STUFF)

    @property
    def background_index(self) -> int | None:
        return 0 if BACKGROUND in self.class_names else None


TOY_PRESETS: dict[str, ToyPreset] = {
    p.name: p
    for p in (
        ToyPreset("objects", "Pascal VOC", (1, 3), (0, 0), (0.06, 0.22), 0.04, (2, 6)),
        ToyPreset("crowd", "COCO-Object", (2, 5), (0, 0), (0.03, 0.11), 0.02, (4, 9)),
        ToyPreset("scenes", "ADE20K and Pascal Context", (2, 4), (2, 3), (0.03, 0.11), 0.02, (0, 0)),
        ToyPreset("stuff", "COCO-Stuff", (0, 2), (2, 4), (0.04, 0.12), 0.03, (0, 0)),
    )
}
#: The training set's draw: each image one preset, with these probabilities.
MIXED_PRESET_WEIGHTS: dict[str, float] = {"objects": 0.35, "crowd": 0.25, "scenes": 0.25, "stuff": 0.15}
PRESET_NAMES: tuple[str, ...] = (*TOY_PRESETS, "mixed")

_SPLIT_CODES = {"train": 0, "val": 1}
_COLOUR_JITTER = 0.08  # relative, per channel
_STAR_INNER_RATIO = 0.45
_CROSS_ARM_RATIO = 0.34  # arm half-width / arm half-length
_RING_INNER_RATIO = 0.5
_MIN_STUFF_FRACTION = 0.12
_MAX_ATTEMPTS = 500


def preset_class_names(preset: str) -> tuple[str, ...]:
    """The class names (label index order) of a preset's dataset."""
    return TOY_CLASS_NAMES if preset == "mixed" else TOY_PRESETS[preset].class_names


# ---- shapes -------------------------------------------------------------------------------------------------------


def _outer_radius(name: str, area: float) -> float:
    """Circumradius (arm half-length for the cross) that gives a shape of the requested area."""
    unit_area = {
        "circle": math.pi,
        "square": 2.0,  # inscribed in a circle of radius R
        "triangle": 3 * math.sqrt(3) / 4,
        "star": 5 * _STAR_INNER_RATIO * math.sin(math.pi / 5),  # 10 vertices alternating R, kR
        "cross": 8 * _CROSS_ARM_RATIO - 4 * _CROSS_ARM_RATIO**2,
        "ring": math.pi * (1 - _RING_INNER_RATIO**2),
    }[name]
    return math.sqrt(area / unit_area)


def _polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if name == "cross":
        a, r = _CROSS_ARM_RATIO * radius, radius
        corners = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]
    radii = {"square": [radius] * 4, "triangle": [radius] * 3, "star": [radius, radius * _STAR_INNER_RATIO] * 5}[name]
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]


def _shape_mask(name: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """The shape's pixels (bool HxW), drawn without anti-aliasing so that the label map is exact."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        if name == "ring":
            inner = radius * _RING_INNER_RATIO
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(name, cx, cy, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


# ---- colours and textures -----------------------------------------------------------------------------------------


def _jittered(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.clip(np.array(COLOURS[colour], dtype=np.float64) * (1 + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3)), 0, 255)


def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x, y


def _thing_texture(rng: np.random.Generator, pattern: str, rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 fill of an object: its colour, with darker stripes or dots."""
    x, y = _coordinates(size)
    dark = rgb * 0.5
    if pattern == "striped":
        period, theta = rng.uniform(4.0, 6.0), rng.uniform(0, math.pi)
        on = np.mod(x * math.cos(theta) + y * math.sin(theta) + rng.uniform(0, period), period) < period / 2
    elif pattern == "dotted":
        period = int(rng.integers(4, 6))
        ox, oy = rng.integers(0, period, 2)
        on = (np.mod(x + ox, period) < 2) & (np.mod(y + oy, period) < 2)
    else:
        on = np.zeros((size, size), dtype=bool)
    return np.where(on[..., None], dark, rgb)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise, smooth over size/cells pixels (HxW)."""
    coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def _stuff_texture(rng: np.random.Generator, name: str, rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 fill of a stuff region: a pattern that names the class, in any colour."""
    x, y = _coordinates(size)
    if name == "grass":  # vertical blades: brightness constant along a column, varying across columns
        columns = rng.uniform(0.5, 1.05, size)
        shade = columns[None, :] + 0.08 * _smooth_noise(rng, size, 4)
    elif name == "water":  # horizontal waves
        period, wobble = rng.uniform(5.0, 7.0), rng.uniform(8.0, 14.0)
        shade = 0.78 + 0.22 * np.sin(2 * math.pi * (y / period + 0.25 * np.sin(2 * math.pi * x / wobble)))
    elif name == "brick":  # courses of bricks with light mortar joints, every other course offset
        height, width = int(rng.integers(5, 8)), int(rng.integers(9, 13))
        course = (y + rng.integers(0, height)) // height
        mortar = (np.mod(y, height) == 0) | (np.mod(x + (course % 2) * (width // 2), width) == 0)
        shade = np.where(mortar, 1.5, 0.85 + 0.1 * rng.uniform(-1, 1, (size, size)))
    else:  # sand: fine speckle
        shade = 0.9 + 0.1 * rng.normal(0, 1, (size, size))
        shade[rng.uniform(size=(size, size)) < 0.12] = 0.55
    return np.clip(rgb * shade[..., None], 0, 255)


def _background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, low-contrast, smooth-noise background (HxWx3)."""
    base = rng.uniform(195, 235) + rng.uniform(-8, 8, size=3)
    smooth = np.stack([6 * _smooth_noise(rng, size, 8) for _ in range(3)], axis=-1)
    return base + smooth + rng.normal(0, 2, (size, size, 3))


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    """Unlabelled strokes and small blobs in the things' colours: background, not objects."""
    size = image.shape[0]
    canvas = Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        colour = tuple(int(v) for v in _jittered(rng, str(rng.choice(list(COLOURS)))))
        if rng.uniform() < 0.6:
            x0, y0 = rng.uniform(0, size, 2)
            length, theta = rng.uniform(6, 16), rng.uniform(0, 2 * math.pi)
            draw.line([x0, y0, x0 + length * math.cos(theta), y0 + length * math.sin(theta)], fill=colour,
                      width=int(rng.integers(1, 3)))
        else:
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(1.0, 2.0)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return np.asarray(canvas, dtype=np.float64)


# ---- scenes -------------------------------------------------------------------------------------------------------


def _stuff_regions(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """A partition of the image into ``count`` organic regions (HxW region ids), each >= _MIN_STUFF_FRACTION."""
    x, y = _coordinates(size)
    for _ in range(_MAX_ATTEMPTS):
        seeds = rng.uniform(0, size, (count, 2))
        distance = np.stack(
            [np.hypot(x - sx, y - sy) + 7 * _smooth_noise(rng, size, 4) for sx, sy in seeds]
        )
        regions = distance.argmin(axis=0)
        if np.bincount(regions.ravel(), minlength=count).min() >= _MIN_STUFF_FRACTION * size * size:
            return regions
    raise RuntimeError(f"could not split a {size} px image into {count} stuff regions of >= {_MIN_STUFF_FRACTION:.0%}")


def _inner_boundary(label: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Pixels of ``classes`` next to another label (4-neighbourhood): the VOC-style ignore band of objects."""
    padded = np.pad(label, 1, mode="edge")  # the image border is not an object boundary
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    )
    return differs & np.isin(label, classes)


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _and_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _make_sample(rng: np.random.Generator, preset: ToyPreset, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One image (HxWx3 uint8), its label map in the vocabulary of ``TOY_CLASS_NAMES`` and its caption."""
    n_things = int(rng.integers(preset.things[0], preset.things[1] + 1))
    n_stuff = int(rng.integers(preset.stuff[0], preset.stuff[1] + 1))
    things = [str(t) for t in rng.choice(THINGS, size=n_things, replace=False)]
    stuff = [str(s) for s in rng.choice(STUFF, size=n_stuff, replace=False)]
    # The scene behind the objects: background with clutter, or stuff regions.
    if n_stuff == 0:
        scene = _draw_clutter(rng, _background_texture(rng, size), int(rng.integers(preset.clutter[0], preset.clutter[1] + 1)))
        scene_label = np.zeros((size, size), dtype=np.uint8)
        stuff_caption: list[str] = []
    else:
        regions = _stuff_regions(rng, size, n_stuff)
        scene = np.zeros((size, size, 3))
        scene_label = np.zeros((size, size), dtype=np.uint8)
        for region, name in enumerate(stuff):
            texture = _stuff_texture(rng, name, _jittered(rng, str(rng.choice(list(COLOURS)))), size)
            scene[regions == region] = texture[regions == region]
            scene_label[regions == region] = TOY_CLASS_NAMES.index(name)
        areas = np.bincount(regions.ravel(), minlength=n_stuff)
        stuff_caption = [stuff[r] for r in np.argsort(-areas, kind="stable")]
    # Objects: count, classes, colours and patterns are drawn once, outside the placement retries, so that
    # rejection does not bias the data towards easy images; only where no placement is found is the last dropped.
    looks = [(str(rng.choice(list(COLOURS))), str(rng.choice(THING_PATTERNS))) for _ in things]
    thing_ids = np.array([TOY_CLASS_NAMES.index(t) for t in things])
    min_pixels = preset.min_visible * size * size
    while True:
        for _ in range(_MAX_ATTEMPTS):
            image, label, centres = scene.copy(), scene_label.copy(), []
            for name, (colour, pattern) in zip(things, looks):
                radius = _outer_radius(name, rng.uniform(*preset.thing_area) * size * size)
                cx, cy = rng.uniform(radius, size - 1 - radius, size=2)
                mask = _shape_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
                fill = _thing_texture(rng, pattern, _jittered(rng, colour), size)
                image[mask] = fill[mask]
                label[mask] = TOY_CLASS_NAMES.index(name)
                centres.append(cx)
            label[_inner_boundary(label, thing_ids)] = IGNORE_INDEX
            if all(np.count_nonzero(label == i) >= min_pixels for i in thing_ids):
                break
        else:
            # (a scene without objects never gets here: its first attempt succeeds)
            things, looks, thing_ids = things[:-1], looks[:-1], thing_ids[:-1]
            continue
        break
    objects = [
        _with_article(f"{'' if pattern == 'plain' else pattern + ' '}{colour} {name}")
        for _, name, (colour, pattern) in sorted(zip(centres, things, looks), key=lambda t: t[0])
    ]
    if objects and stuff_caption:
        caption = f"{_and_join(objects)} on {_and_join(stuff_caption)}"
    else:
        caption = _and_join(objects or stuff_caption)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label, caption


def _check_args(preset: str, n_train: int, n_val: int, image_size: int) -> None:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown toy-world preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    for name, value, lo in (("n_train", n_train, 0), ("n_val", n_val, 0), ("image_size", image_size, 32)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if n_train + n_val == 0:
        raise ValueError("n_train and n_val are both 0; ask for at least one image")


def _image_preset(rng: np.random.Generator, preset: str) -> ToyPreset:
    if preset != "mixed":
        return TOY_PRESETS[preset]
    names = list(MIXED_PRESET_WEIGHTS)
    return TOY_PRESETS[names[int(rng.choice(len(names), p=list(MIXED_PRESET_WEIGHTS.values())))]]


def _local_label_table(preset: str) -> np.ndarray:
    """Lookup table from ``TOY_CLASS_NAMES`` indices to the preset's own label indices."""
    to_local = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for local, name in enumerate(preset_class_names(preset)):
        to_local[TOY_CLASS_NAMES.index(name)] = local
    return to_local


def _write_image(
    tmp: Path, preset: str, to_local: np.ndarray, split: str, index: int, image_size: int, seed: int
) -> str:
    """Draw image ``index`` of ``split`` into ``tmp``; returns its caption. One random stream per image, so that
    changing n_train leaves the val images unchanged and any number of workers gives the same set."""
    rng = np.random.default_rng([seed, PRESET_NAMES.index(preset), _SPLIT_CODES[split], index])
    image, label, caption = _make_sample(rng, _image_preset(rng, preset), image_size)
    image_id = f"toy_{split}_{index:05d}"
    save_image_jpeg(tmp / IMAGE_DIR / f"{image_id}.jpg", image, quality=95)
    save_label_png(tmp / LABEL_DIR / f"{image_id}.png", to_local[label])
    return caption


def _our_class_names(names: tuple[str, ...]) -> bool:
    """classes.json names of an earlier output: a preset's vocabulary (toy-world classes only)."""
    return bool(names) and set(names) <= set(TOY_CLASS_NAMES)


def generate_toy_world(
    root: str | Path,
    *,
    preset: str = "objects",
    n_train: int = 512,
    n_val: int = 64,
    image_size: int = 64,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate a toy-world dataset at ``root`` (deterministic in all arguments but ``workers``, the number of
    processes that draw the images); returns the manifest.

    The set is built in a sibling temp folder and moved into place at the end, so ``root``
    is either absent, the previous complete dataset, or the new complete dataset.
    """
    _check_args(preset, n_train, n_val, image_size)
    root = Path(root)
    refuse_foreign_folder(root, GENERATOR_NAME, _our_class_names)  # before the work; checked again before the swap
    names = preset_class_names(preset)
    to_local = _local_label_table(preset)  # once per set, not per image
    with replace_folder_atomically(root) as tmp, ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        (tmp / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        (tmp / LABEL_DIR).mkdir(parents=True, exist_ok=True)
        captions: dict[str, str] = {}
        for split, count in (("train", n_train), ("val", n_val)):
            if count == 0:
                continue
            ids = [f"toy_{split}_{i:05d}" for i in range(count)]
            draw = partial(_write_image, tmp, preset, to_local, split, image_size=image_size, seed=seed)
            drawn = pool.map(draw, range(count), chunksize=64) if pool else map(draw, range(count))
            captions.update(zip(ids, drawn))
            write_split(tmp, split, ids)
        background_index = names.index(BACKGROUND) if BACKGROUND in names else None
        write_classes_json(tmp, names, ignore_index=IGNORE_INDEX, background_index=background_index)
        write_captions(tmp, captions)
        manifest = write_manifest(
            tmp,
            {
                "generator": GENERATOR_NAME,
                "args": {"preset": preset, "n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed},
                "presets": {name: asdict(p) for name, p in TOY_PRESETS.items()},
                "palette": {name: list(rgb) for name, rgb in COLOURS.items()},
            },
        )
        refuse_foreign_folder(root, GENERATOR_NAME, _our_class_names)
    return manifest
