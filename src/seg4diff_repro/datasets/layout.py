"""The common prepared dataset layout (VOC-like) shared by every dataset in the project.

```
<root>/
  JPEGImages/<image_id>.jpg            RGB images
  SegmentationClass/<image_id>.png     uint8 label map (mode "L" or "P"); 255 = ignore
  ImageSets/Segmentation/<split>.txt   one image id per line
  classes.json                          {"names": [...], "ignore_index": 255, "background_index": 0 | null}
  captions.json                         optional {image_id: caption}
  SAMasks/<image_id>.json              instance masks as COCO RLE, instead of label maps (SA-1B only)
  manifest.json                         written LAST; its presence means "prepared and complete"
```
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Used here and re-exported: other modules and tests import the atomic writers from this module.
from seg4diff_repro.atomic import atomic_write_bytes, atomic_write_json

IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClass"
MASK_DIR = "SAMasks"
SPLIT_DIR = Path("ImageSets") / "Segmentation"
CLASSES_FILE = "classes.json"
CAPTIONS_FILE = "captions.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Label PNGs with the VOC palette, JPEG images
# ---------------------------------------------------------------------------


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map as a flat list of 256*3 ints (255 -> (224, 224, 192))."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        # Classic bit-shuffling: bits 0/1/2 of each 3-bit group go to the high bits of r/g/b.
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    """Atomically save an HxW integer label map (values 0..255) as a VOC-palette PNG (mode "P")."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label for {path} must be 2-D (HxW), got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label for {path} must have an integer dtype, got {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"label for {path} has values outside 0..255 (min {label.min()}, max {label.max()}); "
            "a PNG label map stores uint8 class indices with 255 = ignore"
        )
    image = Image.fromarray(label.astype(np.uint8))  # mode "L"
    image.putpalette(voc_palette())  # turns "L" into "P" without touching the indices
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_image_jpeg(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Atomically save an HxWx3 uint8 RGB array as JPEG (4:4:4 so small coloured regions keep their hue)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image for {path} must be an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
        )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------
# Writers for the metadata files
# ---------------------------------------------------------------------------


def write_classes_json(
    root: str | Path,
    names: Sequence[str],
    *,
    ignore_index: int = 255,
    background_index: int | None,
) -> dict[str, Any]:
    """Validate and atomically write ``classes.json``; returns the written dict.

    ``background_index`` has no default on purpose: datasets without a background class
    (COCO-Stuff, ADE20K) must say ``None`` explicitly.
    """
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class names for {root} must be a non-empty list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names for {root} contain duplicates: {dupes}")
    if len(names) > 255:
        raise ValueError(f"{len(names)} classes for {root} do not fit a uint8 label PNG next to ignore index 255")
    _check_indices(f"classes for {root}", len(names), ignore_index, background_index)
    obj = {"names": names, "ignore_index": ignore_index, "background_index": background_index}
    atomic_write_json(Path(root) / CLASSES_FILE, obj)
    return obj


def write_split(root: str | Path, split: str, ids: Sequence[str]) -> Path:
    """Atomically write ``ImageSets/Segmentation/<split>.txt`` (one id per line); returns its path."""
    if not split or "/" in split or split.strip() != split:
        raise ValueError(f"invalid split name {split!r} for {root}; use a plain name such as 'train' or 'val'")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str) or not i or any(ch.isspace() for ch in i)]
    if bad:
        raise ValueError(f"split {split!r} for {root}: image ids must be non-empty strings without whitespace, got {bad[:5]!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"split {split!r} for {root} lists duplicate image ids")
    path = Path(root) / SPLIT_DIR / f"{split}.txt"
    atomic_write_bytes(path, "".join(f"{i}\n" for i in ids).encode("utf-8"))
    return path


def write_captions(root: str | Path, captions: Mapping[str, str]) -> None:
    """Atomically write ``captions.json`` ({image_id: caption})."""
    bad = [k for k, v in captions.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"captions for {root} must map str image ids to str captions; bad entries: {bad[:5]!r}")
    atomic_write_json(Path(root) / CAPTIONS_FILE, dict(captions))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(root: str | Path, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` last: split sizes, classes, and sha256 of every data/metadata file.

    ``extra`` (e.g. generator arguments, source URLs) is stored verbatim under the key "extra".
    Returns the manifest dict.
    """
    root = Path(root)
    classes = _read_classes(root)
    split_dir = root / SPLIT_DIR
    split_files = sorted(split_dir.glob("*.txt")) if split_dir.is_dir() else []
    if not split_files:
        raise FileNotFoundError(f"no split files in {split_dir}; call write_split() before write_manifest()")
    files = sorted(
        p
        for p in [
            *(root / IMAGE_DIR).glob("*"),
            *(root / LABEL_DIR).glob("*"),
            *(root / MASK_DIR).glob("*"),
            *split_files,
            root / CLASSES_FILE,
            root / CAPTIONS_FILE,
        ]
        # Leftover temp files of an interrupted atomic write are not part of the dataset.
        if p.is_file() and not p.name.startswith(".")
    )
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "splits": {p.stem: len(_read_split_file(p)) for p in split_files},
        "class_names": classes["names"],
        "ignore_index": classes["ignore_index"],
        "background_index": classes["background_index"],
        "files": {p.relative_to(root).as_posix(): _sha256(p) for p in files},
        "extra": dict(extra),
    }
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 of the prepared dataset's manifest, which holds the sha256 of every image, label and split file."""
    read_manifest(root)  # a clear error if the dataset is not (completely) prepared
    return _sha256(Path(root) / MANIFEST_FILE)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``manifest.json``; a missing one means the dataset was never (completely) prepared."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the dataset at {root} is not (completely) prepared. {_hint(root)}")
    return _load_json(path)


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar truth value
class Sample:
    """One image with its label map and optional caption."""

    image_id: str
    image: np.ndarray  # HxWx3 uint8 RGB
    label: np.ndarray  # HxW int64, ignore = ignore_index
    caption: str | None


def _hint(root: str | Path) -> str:
    """What rebuilds a prepared dataset: its prepare rule, named after the folder, forced (a plain `snakemake
    prepare_<name>` does nothing while manifest.json exists)."""
    name = Path(root).name or str(root)
    if name.startswith("toy_world_"):  # one rule, prepare_toy_world, for every preset: force the folder's manifest
        return (f"`snakemake --forcerun {Path(root) / 'manifest.json'}` regenerates the prepared dataset {root} (rule "
                "prepare_toy_world), then re-runs what depends on it.")
    origin = "" if name.startswith("toy_shapes") else f" from its downloaded archives (or `data.paths.{name}`)"
    return f"`snakemake --forcerun prepare_{name}` rebuilds the prepared dataset {root}{origin}, then re-runs what depends on it."


class DamagedFileError(OSError):
    """A file of a prepared dataset exists but cannot be decoded."""


@contextmanager
def _decoding(path: Path, root: Path) -> Iterator[None]:
    """Name the file and the rebuild command when PIL cannot decode it (PIL's own messages name neither)."""
    try:
        yield
    except (OSError, SyntaxError) as error:  # "image file is truncated", UnidentifiedImageError, broken chunks
        if isinstance(error, FileNotFoundError):
            raise
        raise DamagedFileError(f"{path} cannot be decoded ({error}): the file is damaged. {_hint(root)}") from error


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {_hint(path.parent)}") from err


def _check_indices(where: str, num_classes: int, ignore_index: Any, background_index: Any) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise ValueError(f"{where}: ignore_index must be an int in 0..255, got {ignore_index!r}")
    if ignore_index < num_classes:
        raise ValueError(
            f"{where}: ignore_index {ignore_index} collides with class indices 0..{num_classes - 1}"
        )
    if background_index is not None and (
        isinstance(background_index, bool)
        or not isinstance(background_index, int)
        or not 0 <= background_index < num_classes
    ):
        raise ValueError(
            f"{where}: background_index must be null or an int in 0..{num_classes - 1}, got {background_index!r}"
        )


def _read_classes(root: Path) -> dict[str, Any]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. {_hint(root)}")
    obj = _load_json(path)
    if not isinstance(obj, dict) or not {"names", "ignore_index", "background_index"} <= obj.keys():
        raise ValueError(f"{path} must be an object with keys 'names', 'ignore_index', 'background_index'")
    names = obj["names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: 'names' must be a non-empty list of non-empty strings")
    _check_indices(str(path), len(names), obj["ignore_index"], obj["background_index"])
    return obj


def _read_split_file(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} lists some image ids more than once; fix or re-generate the split file")
    return ids


#: How a view of a dataset treats its background class (``classes.json`` ``background_index``):
#: ``class``: an ordinary class at its prepared index; ``last``: an ordinary class moved to the last index
#: (the official voc21.json order); ``ignore``: a class of the vocabulary (so a prompt word and an argmax
#: candidate) whose ground-truth pixels are ignored when scoring (the official COCO-Object open-vocabulary
#: protocol, ignore_label 0); ``drop``: removed from the vocabulary, its pixels ignored (VOC20, PC59).
BACKGROUND_MODES = ("class", "last", "ignore", "drop")


class SegmentationDataset:
    """Reader for one split of a prepared dataset, in one of the views of ``BACKGROUND_MODES``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        background: str = "class",
        limit: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist. {_hint(self.root)}")
        classes = _read_classes(self.root)
        self.ignore_index: int = classes["ignore_index"]
        self._raw_names: list[str] = classes["names"]
        self._raw_background: int | None = classes["background_index"]
        if background not in BACKGROUND_MODES:
            raise ValueError(f"background={background!r} for {self.root}: use one of {list(BACKGROUND_MODES)}")
        if background != "class" and self._raw_background is None:
            raise ValueError(
                f"background={background!r} was asked of {self.root}, but its {CLASSES_FILE} has "
                "background_index null (no background class); use background='class', or re-run the dataset's "
                "prepare target if this dataset should have one (PC59 keeps its background since this version)"
            )
        self.background = background

        self.split_file = self.root / SPLIT_DIR / f"{split}.txt"
        if not self.split_file.is_file():
            available = sorted(p.stem for p in (self.root / SPLIT_DIR).glob("*.txt"))
            raise FileNotFoundError(
                f"split file {self.split_file} does not exist (available splits: {available}). {_hint(self.root)}"
            )
        ids = _read_split_file(self.split_file)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit must be a positive int or None, got {limit!r}")
            ids = ids[:limit]
        if not ids:
            raise ValueError(f"split file {self.split_file} lists no image ids. {_hint(self.root)}")
        # Check every file up front so a broken dataset fails before hours of model inference.
        for image_id in ids:
            for path in (self._image_path(image_id), self._label_path(image_id)):
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path} is missing but image id {image_id!r} is listed in {self.split_file}. {_hint(self.root)}"
                    )
        self.ids: list[str] = ids

        captions_path = self.root / CAPTIONS_FILE
        self._captions: dict[str, str] = {}
        if captions_path.is_file():
            captions = _load_json(captions_path)
            if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
                raise ValueError(f"{captions_path} must be an object mapping image ids to caption strings")
            self._captions = captions

    @property
    def class_names(self) -> list[str]:
        """Class names of this view: background removed (``drop``) or moved to the end (``last``)."""
        others = [n for i, n in enumerate(self._raw_names) if i != self._raw_background]
        if self.background == "drop":
            return others
        if self.background == "last":
            return [*others, self._raw_names[self._raw_background]]
        return list(self._raw_names)

    @property
    def background_index(self) -> int | None:
        """Background class index of this view (None when dropped or absent)."""
        if self.background == "drop":
            return None
        if self.background == "last":
            return len(self._raw_names) - 1
        return self._raw_background

    def label_for_scoring(self, label: np.ndarray) -> np.ndarray:
        """``label`` with the pixels that scoring ignores set to ``ignore_index`` (background under ``ignore``).

        The prompt is built from the label itself, so that under ``ignore`` background is a prompt word.
        """
        if self.background != "ignore":
            return label
        return np.where(label == self._raw_background, self.ignore_index, label)

    def _image_path(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def _label_path(self, image_id: str) -> Path:
        return self.root / LABEL_DIR / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        image_path, label_path = self._image_path(image_id), self._label_path(image_id)
        with _decoding(image_path, self.root), Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        with _decoding(label_path, self.root), Image.open(label_path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(
                    f"{label_path} has PIL mode {im.mode!r}; label maps must be single-channel 'L' or 'P' PNGs"
                )
            raw = np.asarray(im, dtype=np.uint8)  # mode P/L -> raw indices, not palette colours
        if raw.shape != image.shape[:2]:
            raise ValueError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but label "
                f"{label_path} is {raw.shape[1]}x{raw.shape[0]} (WxH)"
            )
        num_classes = len(self._raw_names)
        bad = np.unique(raw[(raw >= num_classes) & (raw != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"{label_path} contains label values {bad.tolist()[:20]} that are neither a class index "
                f"(0..{num_classes - 1}, see {self.root / CLASSES_FILE}) nor ignore_index {self.ignore_index}"
            )
        label = raw.astype(np.int64)
        if self.background in ("drop", "last"):
            bg = self._raw_background
            is_class = label != self.ignore_index
            label = np.where(is_class & (label > bg), label - 1, label)
            label[raw == bg] = self.ignore_index if self.background == "drop" else num_classes - 1
        return Sample(image_id=image_id, image=image, label=label, caption=self._captions.get(image_id))


def refuse_foreign_folder(root: Path, generator: str, our_class_names: Callable[[tuple[str, ...]], bool]) -> None:
    """Raise unless ``root`` is absent, empty or an earlier output of the dataset generator ``generator``, which alone
    may be replaced: its manifest names the generator or, when the manifest is gone (Snakemake deletes a rule's
    declared output, manifest.json, before it re-runs the rule), ``our_class_names`` accepts its classes.json names."""
    if not root.exists() or not any(root.iterdir()):
        return
    manifest, classes = root / MANIFEST_FILE, root / CLASSES_FILE
    try:
        if manifest.is_file():
            ours = json.loads(manifest.read_text()).get("extra", {}).get("generator") == generator
        else:
            ours = classes.is_file() and our_class_names(tuple(json.loads(classes.read_text()).get("names", ())))
    except (ValueError, AttributeError):  # unreadable JSON, or JSON that is not an object: not ours
        ours = False
    if not ours:
        label = generator.replace("_", "-")
        raise FileExistsError(
            f"{root} exists and is not a {label} dataset (no {label} manifest.json or classes.json); "
            "refusing to overwrite it. Delete it or choose another output folder."
        )
