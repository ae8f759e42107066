"""MAGNET's training examples: the official training mappers' preprocessing, as torch Datasets.

Two protocols (docs/method.md#magnet; the official ``mask_former_semantic_dataset_mapper.py``,
``sa1b_dataset_mapper.py`` and ``Seg4DiffTrainer.forward``/``prepare_targets``):

* **COCO** (:class:`CocoProtocolMaskDataset`, a prepared dataset with label maps: ``coco_stuff171_train``, or
  the toy world's ``toy_world_objects`` through :func:`toy_mask_dataset`): ResizeShortestEdge 1024 (no maximum) → a
  random 1024² crop → random horizontal flip → the mapper's "pad to SIZE_DIVISIBILITY 640", whose negative
  padding keeps the **top-left 640×640** (``coco_crop="official"``; ``"none"`` keeps the 1024² crop) → /255,
  zero-pad to a multiple of 32 → bilinear stretch to the model's S×S. Prompt: the space-joined names of the
  classes present (ascending class index, lower-cased); masks: one per present class (ignore excluded), with
  ``class_names`` for identity matching by BPE ids.
* **SA-1B** (:class:`Sa1bMaskDataset`, the prepared ``sa1b_sa_000020``): ResizeShortestEdge 1024 (max 1333) →
  random horizontal flip → /255, zero-pad to a multiple of 32 → stretch to S×S. Masks: non-empty SA masks
  sorted by area, those covering ≤ 0.5 % of the padded image dropped, the largest 32 kept; ``class_names`` is
  None (Hungarian matching). Prompt: the caption's first two "."-separated pieces, each followed by "."
  (the official ``SHORT_CAPTION`` expression, kept as is).

Masks are float {0, 1} on the padded-image grid (the grid the official ``prepare_targets`` pads them to).
Every random choice comes from the ``torch.Generator`` passed to :meth:`example`; ``dataset[i]`` seeds one
from (seed, epoch, i) (:func:`example_generator`), so a run is deterministic and resumable.

Sizes: :class:`MagnetSizes` holds S and the official 1024 / 1333 / 640 / 32; ``MagnetSizes.scaled(S)``
multiplies them by S/1024 (the toy world trains at 64 px: 64 / 83 / 40 / 2) and ``record()`` says so.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from seg4diff_repro.datasets.layout import (
    CAPTIONS_FILE,
    IMAGE_DIR,
    MASK_DIR,
    SPLIT_DIR,
    SegmentationDataset,
    dataset_fingerprint,
    read_manifest,
)

#: The official training resolution; every size of MagnetSizes is given for it and scaled by S / 1024.
OFFICIAL_IMAGE_SIZE = 1024
#: The mapper's pad value for the 640 step (visible only where an image is smaller than 640).
OFFICIAL_PAD_VALUE = 128
COCO_CROPS = ("official", "none")
COCO_PROMPTS = ("class_names", "caption")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no scalar truth value
class MaskExample:
    """One training image: the model input, its prompt, and the ground-truth masks to supervise."""

    image: torch.Tensor  # [3, S, S] float32 in [0, 1]
    prompt: str
    masks: torch.Tensor  # [M, Hm, Wm] float32 in {0, 1}, on the padded-image grid
    class_names: list[str] | None  # one per mask (COCO protocol: identity matching); None for SA-1B (Hungarian)
    image_id: str = ""


@dataclass(frozen=True)
class MagnetSizes:
    """The preprocessing sizes: the model input S and the official mapper sizes (defaults: the official ones)."""

    image_size: int = OFFICIAL_IMAGE_SIZE  # S: the bilinear stretch after padding
    short_edge: int = 1024  # ResizeShortestEdge (both protocols)
    max_size: int = 1333  # ResizeShortestEdge's maximum longer side (SA-1B; COCO has none)
    crop: int = 1024  # COCO's random FixedSizeCrop
    official_crop: int = 640  # COCO's INPUT.SIZE_DIVISIBILITY, whose negative padding keeps the top-left square
    size_divisibility: int = 32  # MODEL.MASK_FORMER.SIZE_DIVISIBILITY: the zero padding before the stretch

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MagnetSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def scaled(cls, image_size: int) -> MagnetSizes:
        """The official sizes times ``image_size`` / 1024 (rounded, at least 1): the recipe at another resolution."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        official = cls()
        factor = image_size / OFFICIAL_IMAGE_SIZE
        return cls(image_size, *(max(1, round(getattr(official, name) * factor))
                                 for name in ("short_edge", "max_size", "crop", "official_crop", "size_divisibility")))

    def record(self) -> dict[str, Any]:
        """These sizes, the official ones, and the factor between them (for the run's outputs)."""
        return {**asdict(self), "scale": self.image_size / OFFICIAL_IMAGE_SIZE, "official": asdict(MagnetSizes())}


def example_generator(seed: int, index: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator for one example, seeded from (seed, epoch, index) alone: resumable in any order."""
    high, low = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(high) << 32) | int(low))


# ---------------------------------------------------------------------------
# The official transforms (detectron2's ResizeShortestEdge, FixedSizeCrop, RandomFlip; the model's padding)
# ---------------------------------------------------------------------------


def resize_shortest_edge_shape(height: int, width: int, short_edge: int, max_size: int | None) -> tuple[int, int]:
    """(new height, new width) of detectron2's ``ResizeShortestEdge.get_output_shape``."""
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max_size is not None and max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """detectron2's ResizeTransform on a uint8 image: PIL bilinear."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """detectron2's ResizeTransform on the semantic label, which the mapper reads as float64: torch 'nearest'."""
    resized = F.interpolate(torch.from_numpy(label.astype(np.float64))[None, None], (height, width), mode="nearest")
    return resized[0, 0].numpy().astype(np.int64)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """detectron2's ResizeTransform on a uint8 instance mask: PIL nearest."""
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _pad_or_crop(array: np.ndarray, size: int, value: int) -> np.ndarray:
    """``F.pad(x, [0, size - W, 0, size - H], value)``: negative padding crops, so the top-left size×size remains."""
    out = array[:size, :size]
    pad = [(0, size - out.shape[0]), (0, size - out.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(out, pad, constant_values=value)


def _model_input(image: np.ndarray, sizes: MagnetSizes) -> tuple[torch.Tensor, tuple[int, int]]:
    """/255, zero padding to a multiple of size_divisibility (bottom and right), bilinear stretch to S×S;
    returns the input and the padded grid (the masks' grid)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    height, width = tensor.shape[-2:]
    div = sizes.size_divisibility
    padded = (-(-height // div) * div, -(-width // div) * div)
    tensor = F.pad(tensor, (0, padded[1] - width, 0, padded[0] - height), value=0.0)
    stretched = F.interpolate(tensor[None], size=(sizes.image_size, sizes.image_size), mode="bilinear",
                              align_corners=False)[0]
    return stretched.clamp_(0.0, 1.0), padded


def _pad_masks(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return np.pad(masks, [(0, 0), (0, grid[0] - masks.shape[1]), (0, grid[1] - masks.shape[2])])


def two_sentence_prompt(caption: str, *, where: str = "caption") -> str:
    """The official SHORT_CAPTION truncation: ``p.split('.')[0] + '.' + p.split('.')[1] + '.'``, as written
    (a one-sentence caption ending in '.' becomes "… ..": the code's behaviour, kept)."""
    pieces = caption.split(".")
    if len(pieces) < 2:
        raise ValueError(
            f"{where} {caption!r} has no '.', so the official two-sentence truncation (split on '.') cannot take "
            "two pieces (the official trainer fails there too); fix the caption file or train without short captions"
        )
    return pieces[0] + "." + pieces[1] + "."


def select_sa1b_masks(areas: np.ndarray, grid_area: int, *, min_area_fraction: float = 0.005,
                      max_masks: int = 32) -> np.ndarray:
    """The official ``prepare_targets(sort=True)``: the indices of the masks to keep, given their areas and the
    padded image's area — masks not above ``min_area_fraction`` of it dropped, the rest largest first (ties
    keep their order), at most ``max_masks``."""
    areas = np.asarray(areas, dtype=np.int64)
    keep = np.flatnonzero(areas / grid_area > min_area_fraction)
    return keep[np.argsort(-areas[keep], kind="stable")][:max_masks]


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


class _MaskDataset(Dataset):
    """Shared parts: sizes, seeding, the record of settings."""

    protocol: str

    def __init__(self, root: str | Path, split: str, image_size: int, sizes: MagnetSizes | None, seed: int) -> None:
        self.root = Path(root)
        self.split = split
        if sizes is None:
            sizes = MagnetSizes.scaled(image_size)
        elif sizes.image_size != image_size:
            raise ValueError(f"sizes.image_size ({sizes.image_size}) differs from image_size ({image_size}); give one")
        self.sizes = sizes
        self.seed = int(seed)
        self.epoch = 0
        read_manifest(self.root)  # a clear error (with the rule that rebuilds it) if not completely prepared

    def set_epoch(self, epoch: int) -> None:
        """Which pass over the data ``dataset[i]`` draws its augmentation for."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> MaskExample:
        return self.example(index, example_generator(self.seed, index, self.epoch))

    def example(self, index: int, generator: torch.Generator) -> MaskExample:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """The settings that decide the examples, for the training outputs."""
        return {
            "mapper": self.protocol,  # the official data mapper these examples follow (the run may match otherwise)
            "root": str(self.root),
            "split": self.split,
            "images": len(self),
            "dataset_fingerprint": dataset_fingerprint(self.root),
            "sizes": self.sizes.record(),
            "seed": self.seed,
            "augmentation_seed": "torch.Generator from numpy SeedSequence([seed, epoch, index]) unless one is passed",
        }


class CocoProtocolMaskDataset(_MaskDataset):
    """The COCO protocol on any prepared dataset with label maps (``coco_stuff171_train``, the toy world's sets)."""

    protocol = "coco"

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        image_size: int = OFFICIAL_IMAGE_SIZE,
        sizes: MagnetSizes | None = None,
        coco_crop: Literal["official", "none"] = "official",
        prompt: Literal["class_names", "caption"] = "class_names",
        background: str = "class",
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        """``coco_crop``: "official" keeps the mapper's top-left 640² of the 1024² crop, "none" the whole crop.
        ``prompt``: "class_names" (the official GT_ONLY_PROMPT) or "caption" (the paper's text: the image's
        caption, truncated to two sentences). ``background``: the view of the prepared background class
        (``datasets.layout.BACKGROUND_MODES``; "drop" leaves it out of prompts and masks)."""
        super().__init__(root, split, image_size, sizes, seed)
        if coco_crop not in COCO_CROPS:
            raise ValueError(f"coco_crop={coco_crop!r}; use one of {list(COCO_CROPS)}")
        if prompt not in COCO_PROMPTS:
            raise ValueError(f"prompt={prompt!r}; use one of {list(COCO_PROMPTS)}")
        self.coco_crop = coco_crop
        self.prompt = prompt
        self.background = background
        self.data = SegmentationDataset(self.root, split, background=background, limit=limit)
        self.class_names = self.data.class_names

    def __len__(self) -> int:
        return len(self.data)

    def example(self, index: int, generator: torch.Generator) -> MaskExample:
        sample = self.data[index]
        sizes = self.sizes
        image, label = sample.image, self.data.label_for_scoring(sample.label)
        height, width = resize_shortest_edge_shape(*label.shape, sizes.short_edge, None)
        image, label = _resize_image(image, height, width), _resize_label(label, height, width)
        # FixedSizeCrop(pad=False): one uniform draw scales the offset range of both axes.
        u = _uniform(generator)
        top, left = (int(np.round(max(extent - sizes.crop, 0) * u)) for extent in (height, width))
        image = image[top: top + sizes.crop, left: left + sizes.crop]
        label = label[top: top + sizes.crop, left: left + sizes.crop]
        if _uniform(generator) < 0.5:  # RandomFlip (horizontal, p = 0.5)
            image, label = image[:, ::-1], label[:, ::-1]
        if self.coco_crop == "official":
            image = _pad_or_crop(image, sizes.official_crop, OFFICIAL_PAD_VALUE)
            label = _pad_or_crop(label, sizes.official_crop, self.data.ignore_index)
        tensor, grid = _model_input(image, sizes)
        classes = [int(c) for c in np.unique(label) if c != self.data.ignore_index]
        names = [self.class_names[c] for c in classes]
        masks = _pad_masks(np.stack([label == c for c in classes]) if classes else
                           np.zeros((0, *label.shape), dtype=bool), grid)
        if self.prompt == "class_names":
            text = " ".join(names).lower()
        elif sample.caption is None:
            raise ValueError(f"prompt='caption' but {self.root / CAPTIONS_FILE} has no caption for {sample.image_id}")
        else:
            text = two_sentence_prompt(sample.caption, where=f"caption of {sample.image_id}")
        return MaskExample(image=tensor, prompt=text, masks=torch.from_numpy(masks.astype(np.float32)),
                           class_names=names, image_id=sample.image_id)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "coco_crop": self.coco_crop, "prompt": self.prompt, "background": self.background,
                "class_names": self.class_names}


def toy_mask_dataset(
    root: str | Path, *, image_size: int = 64, background: str = "drop", **kwargs: Any
) -> CocoProtocolMaskDataset:
    """The toy world's MAGNET training set: a prepared toy-world train split under the COCO protocol, at the
    toy model's resolution with every size scaled by S/1024. Background is dropped by default, as in the
    toy VOC20-style evaluation (``toy_objects``): the prompts name the objects only."""
    return CocoProtocolMaskDataset(root, image_size=image_size, background=background, **kwargs)


class Sa1bMaskDataset(_MaskDataset):
    """The SA-1B protocol on the prepared ``sa1b_sa_000020`` (JPEGImages/, SAMasks/ RLE, captions.json)."""

    protocol = "sa1b"

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        image_size: int = OFFICIAL_IMAGE_SIZE,
        sizes: MagnetSizes | None = None,
        min_area_fraction: float = 0.005,
        max_masks: int = 32,
        short_caption: bool = True,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        """``min_area_fraction`` and ``max_masks``: the official filter (> 0.5 % of the padded image, largest 32).
        ``short_caption``: the official two-sentence truncation (SHORT_CAPTION: True)."""
        super().__init__(root, split, image_size, sizes, seed)
        self.min_area_fraction = float(min_area_fraction)
        self.max_masks = int(max_masks)
        self.short_caption = bool(short_caption)
        split_file = self.root / SPLIT_DIR / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} does not exist: is {self.root} a prepared SA-1B set?")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()][:limit]
        captions_file = self.root / CAPTIONS_FILE
        self.captions: dict[str, str] = json.loads(captions_file.read_text()) if captions_file.is_file() else {}
        for image_id in self.ids:
            for path in (self.root / IMAGE_DIR / f"{image_id}.jpg", self.root / MASK_DIR / f"{image_id}.json"):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing but {image_id} is listed in {split_file}; "
                                            "`snakemake --forcerun prepare_sa1b_sa_000020` rebuilds the set")
            if image_id not in self.captions:
                raise ValueError(f"{captions_file} has no caption for {image_id}")

    def __len__(self) -> int:
        return len(self.ids)

    def _candidate_masks(self, image_id: str, stored_hw: tuple[int, int], resized_hw: tuple[int, int],
                         grid_area: int) -> list[np.ndarray]:
        """The stored masks that can pass the area filter, decoded. A nearest resize by s repeats each row (column)
        at most ceil(s) times, so a mask of area a has at most a·ceil(sy)·ceil(sx) pixels after it: masks whose
        bound is not above the threshold are never decoded (exact: the filter on the resized masks decides)."""
        from pycocotools import mask as mask_utils

        path = self.root / MASK_DIR / f"{image_id}.json"
        record = json.loads(path.read_text())
        if (record["height"], record["width"]) != stored_hw:
            raise ValueError(f"{path}: masks are {record['height']}x{record['width']}, the image {stored_hw[0]}x"
                             f"{stored_hw[1]} (HxW); rebuild with `snakemake --forcerun prepare_sa1b_sa_000020`")
        growth = (-(-resized_hw[0] // stored_hw[0])) * (-(-resized_hw[1] // stored_hw[1]))
        rles = [dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
                for ann in record["annotations"] if ann["area"] * growth / grid_area > self.min_area_fraction]
        if not rles:
            return []
        with warnings.catch_warnings():  # pycocotools <= 2.0.11 warns on every decode under NumPy 2
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pycocotools(\.|$)")
            decoded = mask_utils.decode(rles)  # [H, W, N]
        return [decoded[:, :, k] for k in range(decoded.shape[2])]

    def example(self, index: int, generator: torch.Generator) -> MaskExample:
        image_id, sizes = self.ids[index], self.sizes
        with Image.open(self.root / IMAGE_DIR / f"{image_id}.jpg") as im:
            image = np.asarray(im.convert("RGB"))
        stored_hw = image.shape[:2]
        height, width = resize_shortest_edge_shape(*stored_hw, sizes.short_edge, sizes.max_size)
        image = _resize_image(image, height, width)
        flip = _uniform(generator) < 0.5  # RandomFlip (horizontal, p = 0.5)
        if flip:
            image = image[:, ::-1]
        tensor, grid = _model_input(image, sizes)
        resized = [_resize_mask(m, height, width)
                   for m in self._candidate_masks(image_id, stored_hw, (height, width), grid[0] * grid[1])]
        # Padding adds no mask pixels, so the areas on the resized grid are those on the padded one.
        chosen = select_sa1b_masks(np.array([m.sum(dtype=np.int64) for m in resized]), grid[0] * grid[1],
                                   min_area_fraction=self.min_area_fraction, max_masks=self.max_masks)
        masks = np.stack([resized[k] for k in chosen]) if len(chosen) else np.zeros((0, height, width), np.uint8)
        masks = _pad_masks(masks[:, :, ::-1] if flip else masks, grid)
        caption = self.captions[image_id]
        prompt = two_sentence_prompt(caption, where=f"caption of {image_id}") if self.short_caption else caption
        return MaskExample(image=tensor, prompt=prompt, masks=torch.from_numpy(masks.astype(np.float32)),
                           class_names=None, image_id=image_id)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "min_area_fraction": self.min_area_fraction, "max_masks": self.max_masks,
                "short_caption": self.short_caption}
