"""Turn each evaluation dataset's raw release into the common prepared layout (see ``layout.py``).

One entry point, :func:`prepare_dataset`, for every dataset. The raw data come either from the verified
archives in the downloads folder (only the members needed are extracted, through
:class:`~seg4diff_repro.datasets.download.SafeArchive`) or from a folder holding the user's existing copy
(``data.paths.<name>``). Every dataset then goes through the same steps:

1. build the label maps of the split (value = index into the class list, 255 = ignore), checking the raw
   label values and naming the file of any value outside the class range;
2. copy (or, when not already RGB JPEG, convert) the images;
3. check the image count against the published count (overridable with ``expected_count``, never off);
4. write ``classes.json``, the split file and, last, ``manifest.json`` -- all in a hidden staging folder
   that is renamed into place only when complete, so a failure never leaves a dataset that looks done.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..atomic import replace_folder_atomically
from . import sources
from .download import LoginRequiredError, SafeArchive, verify_file
from .layout import (
    IMAGE_DIR,
    MASK_DIR,
    atomic_write_json,
    save_image_jpeg,
    save_label_png,
    write_captions,
    write_classes_json,
    write_manifest,
    write_split,
)

log = logging.getLogger(__name__)

IGNORE = 255
JPEG_QUALITY = 95  # for sources that are not already RGB JPEG (Cityscapes PNGs, grey/CMYK JPEGs)


class PrepareError(RuntimeError):
    """The raw data cannot be turned into a valid prepared dataset."""


class LabelValueError(PrepareError):
    """A raw label file holds a value outside the dataset's class range."""


class CountMismatchError(PrepareError):
    """The split does not have the published number of images."""


class MissingSourceError(PrepareError, FileNotFoundError):
    """An archive or raw file the dataset needs is not there."""


def load_class_info(name: str) -> dict[str, Any]:
    """The package-data class list (``data/classes/<name>.json``) with its label-mapping tables."""
    text = resources.files("seg4diff_repro").joinpath("data", "classes", f"{name}.json").read_text("utf-8")
    return json.loads(text)


# ---------------------------------------------------------------------------
# Small helpers shared by the datasets
# ---------------------------------------------------------------------------


@dataclass
class _Result:
    ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class _Writer:
    """Writes images and labels into the staging folder and counts conversions."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.out = out
        self.progress = progress
        self.reencoded = 0
        (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)

    def image(self, image_id: str, src: Path) -> tuple[int, int]:
        """Copy an RGB JPEG as is (bit-exact) or convert anything else; returns (width, height)."""
        if not src.is_file():
            raise MissingSourceError(f"image {src} is missing (needed for image id {image_id!r})")
        dst = self.out / "JPEGImages" / f"{image_id}.jpg"
        try:
            with Image.open(src) as im:
                size = im.size
                if im.format == "JPEG" and im.mode == "RGB":
                    shutil.copyfile(src, dst)
                else:
                    im.load()
                    save_image_jpeg(dst, np.asarray(im.convert("RGB"), dtype=np.uint8), quality=JPEG_QUALITY)
                    self.reencoded += 1
        except (OSError, SyntaxError, ValueError) as err:
            raise PrepareError(f"cannot read image {src} ({err}); the source is corrupt") from err
        return size

    def label(self, image_id: str, label: np.ndarray, image_size: tuple[int, int], *, source: Path | str) -> None:
        if (label.shape[1], label.shape[0]) != tuple(image_size):
            raise PrepareError(
                f"size mismatch for image id {image_id!r}: label {source} is {label.shape[1]}x{label.shape[0]} "
                f"but the image is {image_size[0]}x{image_size[1]} (WxH)"
            )
        save_label_png(self.out / "SegmentationClass" / f"{image_id}.png", label.astype(np.uint8))

    def iterate(self, items, desc: str):
        from seg4diff_repro.progress import progress

        return progress(items, desc=desc, disable=not self.progress, interval=30.0)


def _read_index_png(path: Path) -> np.ndarray:
    """Raw indices of a single-channel label PNG (mode P/L/I); refuses RGB colour-coded labels."""
    if not path.is_file():
        raise MissingSourceError(f"label file {path} is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise PrepareError(f"{path}: label PNG has mode {im.mode!r}; expected a single-channel index image")
            return np.asarray(im).astype(np.int64)
    except (OSError, SyntaxError) as err:
        raise PrepareError(f"cannot read label file {path} ({err}); the source is corrupt") from err


def _lut_apply(raw: np.ndarray, lut: np.ndarray, path: Path | str, valid_desc: str) -> np.ndarray:
    """Map raw values through ``lut`` (-1 = invalid value); name the file and values that are invalid."""
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])
        raise LabelValueError(f"{path}: label values {bad.tolist()[:20]} are outside {valid_desc}")
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])
        raise LabelValueError(f"{path}: label values {bad.tolist()[:20]} are outside {valid_desc}")
    return mapped


def _first_dir(candidates: list[Path], what: str, root: Path, must_contain: str | None = None) -> Path:
    for c in candidates:
        if c.is_dir() and (must_contain is None or any(c.glob(must_contain))):
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise MissingSourceError(f"cannot find {what} under {root}; looked for:\n  {tried}")


def _first_file(candidates: list[Path], what: str, root: Path) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise MissingSourceError(f"cannot find {what} under {root}; looked for:\n  {tried}")


@contextlib.contextmanager
def _stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _quiet_pycocotools():
    """pycocotools (<= 2.0.11) emits a NumPy-2 DeprecationWarning on every mask decode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pycocotools(\.|$)")
        yield


# ---------------------------------------------------------------------------
# PASCAL VOC 2012 (voc21)
# ---------------------------------------------------------------------------

VOC12 = "VOCdevkit/VOC2012"


def _voc21_locate(raw: Path) -> dict[str, Any]:
    voc = _first_dir([raw / VOC12, raw / "VOC2012", raw], "VOC2012 (with SegmentationClass/)", raw, "SegmentationClass")
    return {"voc": voc}


def _voc21_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    with SafeArchive(archives["voc2012_trainval"]) as arc:
        split = f"{VOC12}/ImageSets/Segmentation/val.txt"
        if split not in arc.members:
            raise PrepareError(f"{arc.path} has no member {split}; is it the VOC2012 trainval tar?")
        ids = arc.read_bytes(split).decode().split()
        wanted = {split}
        wanted |= {f"{VOC12}/JPEGImages/{i}.jpg" for i in ids} | {f"{VOC12}/SegmentationClass/{i}.png" for i in ids}
        arc.extract(work, wanted)
    return {"voc": work / VOC12}


def _voc21_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    voc: Path = paths["voc"]
    split_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    if not split_file.is_file():
        raise MissingSourceError(f"VOC2012 split file {split_file} is missing")
    ids = split_file.read_text().split()
    n = len(classes["names"])
    lut = np.full(256, -1, dtype=np.int64)
    lut[:n] = np.arange(n)
    lut[IGNORE] = IGNORE  # VOC's object boundaries / difficult regions
    for image_id in w.iterate(ids, "voc21"):
        size = w.image(image_id, voc / "JPEGImages" / f"{image_id}.jpg")
        png = voc / "SegmentationClass" / f"{image_id}.png"
        label = _lut_apply(_read_index_png(png), lut, png, f"the {n} VOC classes (0..{n - 1}) and 255")
        w.label(image_id, label, size, source=png)
    return _Result(ids, {"label_source": "VOC2012 SegmentationClass (val.txt of ImageSets/Segmentation)"})


# ---------------------------------------------------------------------------
# COCO-Object (coco_object)
# ---------------------------------------------------------------------------


def _coco_object_locate(raw: Path) -> dict[str, Any]:
    return {
        "images": _first_dir([raw / "val2017", raw / "images" / "val2017"], "COCO val2017 images", raw, "*.jpg"),
        "instances": _first_file(
            [raw / "annotations" / "instances_val2017.json", raw / "instances_val2017.json"],
            "instances_val2017.json",
            raw,
        ),
    }


def _coco_object_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    with SafeArchive(archives["coco_val2017_images"]) as arc:
        arc.extract(work, lambda rel: rel.startswith("val2017/"))
    ann = "annotations/instances_val2017.json"
    with SafeArchive(archives["coco_annotations_trainval2017"]) as arc:
        if ann not in arc.members:
            raise PrepareError(f"{arc.path} has no member {ann}; is it annotations_trainval2017.zip?")
        arc.extract(work, {ann})
    return {"images": work / "val2017", "instances": work / ann}


def _coco_object_one(img: dict, coco, index_of: dict, ann_file: Path, paths: Mapping[str, Any], w: _Writer) -> str:
    image_id = Path(img["file_name"]).stem
    size = w.image(image_id, paths["images"] / img["file_name"])
    label = np.zeros((img["height"], img["width"]), dtype=np.uint8)
    # Larger instances first, so smaller (often occluding) objects stay visible on top.
    for ann in sorted(coco.imgToAnns.get(img["id"], []), key=lambda a: -float(a.get("area", 0.0))):
        cls = index_of.get(ann["category_id"])
        if cls is None:
            raise LabelValueError(
                f"{ann_file}: annotation {ann.get('id')} of image {img['file_name']} has category_id "
                f"{ann['category_id']}, outside the 80 COCO object classes"
            )
        mask = coco.annToMask(ann)
        if mask.shape != label.shape:
            raise PrepareError(f"{ann_file}: annotation {ann.get('id')} mask size does not match image {img['file_name']}")
        label[mask > 0] = cls
    w.label(image_id, label, size, source=f"{ann_file} (image {img['file_name']})")
    return image_id


def _coco_object_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    from pycocotools.coco import COCO

    ann_file: Path = paths["instances"]
    with _stdout_to_stderr():
        try:
            coco = COCO(str(ann_file))
        except (ValueError, KeyError, TypeError) as err:
            raise PrepareError(f"{ann_file} is not a COCO instances file ({err})") from err
    cat_ids: list[int] = classes["coco_category_ids"]
    index_of = {cid: i + 1 for i, cid in enumerate(cat_ids)}  # background = 0
    have = sorted(coco.cats)
    if have != cat_ids:
        raise PrepareError(
            f"{ann_file}: category ids {have[:10]}... differ from the 80 COCO thing categories "
            f"{cat_ids[:10]}...; is it instances_val2017.json?"
        )
    images = sorted(coco.imgs.values(), key=lambda im: im["id"])
    ids = []
    with _quiet_pycocotools():
        for img in w.iterate(images, "coco_object"):
            ids.append(_coco_object_one(img, coco, index_of, ann_file, paths, w))
    return _Result(
        ids,
        {
            "label_source": "instances_val2017.json rasterised with pycocotools annToMask",
            "assumptions": [
                "[assumption] overlapping instances: painted largest area first, so smaller ones win",
                "[assumption] iscrowd regions are labelled with their class (not ignored)",
                "[assumption] pixels of no instance are background (0); there are no ignore pixels",
            ],
        },
    )


# ---------------------------------------------------------------------------
# PASCAL-Context-59 (pc59)
# ---------------------------------------------------------------------------

VOC10 = "VOCdevkit/VOC2010"


def _load_detail_json(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or "images" not in data or "annos_segmentation" not in data:
            raise ValueError("missing 'images' / 'annos_segmentation'")
        return data
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path} is not the PASCAL-Context Detail-API json trainval_merged.json ({err})") from err


def _pc59_locate(raw: Path) -> dict[str, Any]:
    voc = _first_dir([raw / VOC10, raw / "VOC2010", raw], "VOC2010 (with JPEGImages/)", raw, "JPEGImages")
    json_path = _first_file(
        [raw / "trainval_merged.json", voc / "trainval_merged.json", raw / "VOCdevkit" / "trainval_merged.json"],
        "trainval_merged.json",
        raw,
    )
    return {"voc": voc, "json": json_path}


def _pc59_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    json_path = archives["pascal_context_trainval_merged"]
    data = _load_detail_json(json_path)
    names = {im["file_name"] for im in data["images"] if im.get("phase") == "val"}
    with SafeArchive(archives["voc2010_trainval"]) as arc:
        arc.extract(work, {f"{VOC10}/JPEGImages/{n}" for n in names})
    return {"voc": work / VOC10, "json": json_path, "detail": data}


def _pc59_one(img: dict, by_image: dict, lut: np.ndarray, json_path: Path, paths: Mapping[str, Any], w: _Writer) -> str:
    from pycocotools import mask as mask_utils

    image_id = Path(img["file_name"]).stem
    size = w.image(image_id, paths["voc"] / "JPEGImages" / img["file_name"])
    h, w_ = img["height"], img["width"]
    full = np.zeros((h, w_), dtype=np.int64)
    for ann in by_image.get(img["image_id"], []):  # json order; later annotations overwrite
        cat = ann["category_id"]
        if not isinstance(cat, int) or not 0 <= cat <= 459:
            raise LabelValueError(
                f"{json_path}: annotation {ann.get('id')} of {img['file_name']} has category_id {cat!r}, "
                "outside the 459 PASCAL-Context classes (1..459)"
            )
        seg = ann["segmentation"]
        if isinstance(seg.get("counts"), list):
            seg = mask_utils.frPyObjects(seg, h, w_)
        m = mask_utils.decode(seg)
        if m.shape != full.shape:
            raise PrepareError(f"{json_path}: annotation {ann.get('id')} mask size does not match {img['file_name']}")
        full[m > 0] = cat
    w.label(image_id, lut[full], size, source=f"{json_path} (image {img['file_name']})")
    return image_id


def _pc59_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    json_path: Path = paths["json"]
    data = paths.get("detail") or _load_detail_json(json_path)
    # Detail ids 1..459 (0 = unannotated): the 59 classes -> 1..59, every other pixel -> background 0.
    lut = np.full(460, classes["background_index"], dtype=np.int64)
    lut[np.asarray(classes["context_category_ids"])] = np.arange(1, len(classes["names"]))
    by_image: dict[int, list[dict]] = {}
    for ann in data["annos_segmentation"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    val = sorted((im for im in data["images"] if im.get("phase") == "val"), key=lambda im: im["file_name"])
    ids = []
    with _quiet_pycocotools():
        for img in w.iterate(val, "pc59"):
            ids.append(_pc59_one(img, by_image, lut, json_path, paths, w))
    return _Result(
        ids,
        {
            "label_source": (
                "PASCAL-Context trainval_merged.json (Detail API, 459 classes, phase 'val'); the 59 ids of "
                "data/classes/pc59.json -> 1..59 in ascending id order, every other pixel -> background 0 (the "
                "PASCAL-Context-60 convention); the background: drop view is the detectron2 / official PC59 "
                "(0..58, background -> 255)"
            ),
            "assumptions": [
                "[assumption] overlapping annotations: painted in json order, later ones win",
                "[assumption] background = the other 400 classes and unannotated pixels (the official "
                "background GT generator is not released)",
            ],
        },
    )


# ---------------------------------------------------------------------------
# ADE20K-150 (ade150)
# ---------------------------------------------------------------------------

ADE = "ADEChallengeData2016"


def _ade150_locate(raw: Path) -> dict[str, Any]:
    ade = _first_dir([raw / ADE, raw], "ADEChallengeData2016 (with images/validation/)", raw, "images/validation")
    return {"ade": ade}


def _ade150_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    with SafeArchive(archives["ade20k_challenge"]) as arc:
        arc.extract(
            work,
            lambda rel: rel.startswith((f"{ADE}/images/validation/", f"{ADE}/annotations/validation/")),
        )
    return {"ade": work / ADE}


def _ade150_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    ade: Path = paths["ade"]
    ann_dir, img_dir = ade / "annotations" / "validation", ade / "images" / "validation"
    if not ann_dir.is_dir():
        raise MissingSourceError(f"ADE20K annotation folder {ann_dir} is missing")
    ids = sorted(p.stem for p in ann_dir.glob("*.png"))
    n = len(classes["names"])
    lut = np.full(256, -1, dtype=np.int64)
    lut[0] = IGNORE  # "other objects"
    lut[1 : n + 1] = np.arange(n)
    for image_id in w.iterate(ids, "ade150"):
        size = w.image(image_id, img_dir / f"{image_id}.jpg")
        png = ann_dir / f"{image_id}.png"
        label = _lut_apply(_read_index_png(png), lut, png, f"ADE20K's 0..{n} (0 = other -> ignore)")
        w.label(image_id, label, size, source=png)
    return _Result(ids, {"label_source": "ADEChallengeData2016 annotations/validation: v -> v-1, 0 -> 255"})


# ---------------------------------------------------------------------------
# COCO-Stuff-27 (coco_stuff27)
# ---------------------------------------------------------------------------


def _coco_stuff27_locate(raw: Path) -> dict[str, Any]:
    images = _first_dir([raw / "val2017", raw / "images" / "val2017"], "COCO val2017 images", raw, "*.jpg")
    maps = _first_dir(
        [
            raw / "stuffthingmaps_trainval2017" / "val2017",
            raw / "stuffthingmaps" / "val2017",
            raw / "annotations" / "val2017",
            raw / "val2017",
        ],
        "COCO-Stuff stuffthingmaps val2017 PNGs",
        raw,
        "*.png",
    )
    return {"images": images, "maps": maps}


def _coco_stuff27_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    with SafeArchive(archives["coco_val2017_images"]) as arc:
        arc.extract(work, lambda rel: rel.startswith("val2017/"))
    maps = work / "stuffthingmaps_trainval2017"
    with SafeArchive(archives["cocostuff_stuffthingmaps_trainval2017"]) as arc:
        arc.extract(maps, lambda rel: rel.startswith("val2017/") and rel.endswith(".png"))
    return {"images": work / "val2017", "maps": maps / "val2017"}


def _coco_stuff27_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    maps: Path = paths["maps"]
    ids = sorted(p.stem for p in maps.glob("*.png"))
    lut = np.full(256, -1, dtype=np.int64)
    lut[: len(classes["fine_to_coarse"])] = classes["fine_to_coarse"]
    lut[IGNORE] = IGNORE  # unlabeled
    for image_id in w.iterate(ids, "coco_stuff27"):
        size = w.image(image_id, paths["images"] / f"{image_id}.jpg")
        png = maps / f"{image_id}.png"
        label = _lut_apply(_read_index_png(png), lut, png, "COCO-Stuff's 0..181 and 255 (unlabeled)")
        w.label(image_id, label, size, source=png)
    return _Result(
        ids,
        {
            "label_source": "stuffthingmaps_trainval2017 val2017 PNGs (0..181, 255) -> PiCIE/STEGO 27 coarse classes",
            "assumptions": [
                "[assumption] all 5000 val2017 images (Seg4Diff's annotations_27_detectron2 generator is not released)",
                "[assumption] STEGO's class order; the official coco_stuff_27.json orders stuff classes differently",
            ],
        },
    )


# ---------------------------------------------------------------------------
# Cityscapes (cityscapes)
# ---------------------------------------------------------------------------


def _cityscapes_locate(raw: Path) -> dict[str, Any]:
    base = raw / "cityscapes" if (raw / "cityscapes" / "gtFine").is_dir() else raw
    return {
        "images": _first_dir([base / "leftImg8bit" / "val"], "Cityscapes leftImg8bit/val", raw),
        "labels": _first_dir([base / "gtFine" / "val"], "Cityscapes gtFine/val", raw),
    }


def _cityscapes_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    with SafeArchive(archives["cityscapes_gtfine_trainvaltest"]) as arc:
        arc.extract(work, lambda rel: rel.startswith("gtFine/val/") and rel.endswith("_gtFine_labelIds.png"))
    with SafeArchive(archives["cityscapes_leftimg8bit_trainvaltest"]) as arc:
        arc.extract(work, lambda rel: rel.startswith("leftImg8bit/val/"))
    return {"images": work / "leftImg8bit" / "val", "labels": work / "gtFine" / "val"}


def _cityscapes_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    suffix = "_gtFine_labelIds"
    pngs = sorted(paths["labels"].glob(f"*/*{suffix}.png"))
    lut = np.full(classes["max_label_id"] + 1, IGNORE, dtype=np.int64)
    for label_id, train_id in classes["label_id_to_train_id"].items():
        lut[int(label_id)] = train_id
    ids = []
    for png in w.iterate(pngs, "cityscapes"):
        city = png.parent.name
        image_id = png.name[: -len(suffix + ".png")]
        size = w.image(image_id, paths["images"] / city / f"{image_id}_leftImg8bit.png")
        label = _lut_apply(_read_index_png(png), lut, png, f"Cityscapes label ids 0..{classes['max_label_id']}")
        w.label(image_id, label, size, source=png)
        ids.append(image_id)
    return _Result(
        ids,
        {
            "label_source": "gtFine val *_gtFine_labelIds.png -> 19 trainIds (cityscapesscripts labels.py), others 255",
            "assumptions": [
                f"[assumption] leftImg8bit PNGs stored as JPEG (quality {JPEG_QUALITY}, 4:4:4) to fit the common layout",
            ],
        },
    )


# ---------------------------------------------------------------------------
# Caption files of the official repository (MAGNET's training lists and prompts)
# ---------------------------------------------------------------------------


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content: sha1 of ``b"blob <size>\\0"`` followed by the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_git_blob(path: Path, archive: sources.Archive) -> None:
    """Refuse a file of a git repository whose content is not the blob of the pinned commit's tree."""
    if archive.git_blob is None:
        return
    actual = git_blob_id(path)
    if actual != archive.git_blob:
        raise PrepareError(
            f"{path} is not the official {archive.filename}: its git blob id is {actual}, the file at commit "
            f"{sources.SEG4DIFF_COMMIT[:7]} of github.com/cvlab-kaist/Seg4Diff has {archive.git_blob}. Delete it and "
            f"download it again from {archive.urls[0]} (or pin another file with "
            f"data.source_overrides.{archive.key}.checksum)"
        )


def _load_caption_file(path: Path) -> dict[str, str]:
    """An official caption file: {image id: caption}."""
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path} is not valid JSON ({err}); delete it and download it again") from err
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in captions.items()):
        raise PrepareError(f"{path} must be a JSON object mapping image ids to caption strings")
    if not captions:
        raise PrepareError(f"{path} lists no image")
    return captions


def _existing_caption_file(raw: Path, archive_key: str) -> Path:
    """The official caption file in an existing raw copy, checked against its git blob id (archives are
    checked by prepare_dataset, unless a checksum override pins another file)."""
    archive = sources.ARCHIVES[archive_key]
    name = archive.filename
    path = _first_file([raw / name, raw / "captions" / name, raw / "datasets" / "captions" / name], name, raw)
    check_git_blob(path, archive)
    return path


# ---------------------------------------------------------------------------
# MAGNET's COCO training set (coco_stuff171_train): the official 10,001-image list, COCO-Stuff-171 labels
# ---------------------------------------------------------------------------


def _coco_stuff171_train_locate(raw: Path) -> dict[str, Any]:
    return {
        "images": _first_dir([raw / "train2017", raw / "images" / "train2017"], "COCO train2017 images", raw, "*.jpg"),
        "maps": _first_dir(
            [
                raw / "stuffthingmaps_trainval2017" / "train2017",
                raw / "stuffthingmaps" / "train2017",
                raw / "annotations" / "train2017",
                raw / "train2017",
            ],
            "COCO-Stuff stuffthingmaps train2017 PNGs",
            raw,
            "*.png",
        ),
        "captions": _existing_caption_file(raw, "seg4diff_train_caption_coco"),
    }


def _coco_stuff171_train_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    captions = archives["seg4diff_train_caption_coco"]
    ids = sorted(_load_caption_file(captions))
    with SafeArchive(archives["coco_train2017_images"]) as arc:
        wanted = {f"train2017/{i}.jpg" for i in ids}
        missing = sorted(wanted - set(arc.members))
        if missing:
            raise PrepareError(
                f"{arc.path} lacks {len(missing)} of the {len(ids)} images of {captions.name} (e.g. {missing[:3]}); "
                "is it COCO's train2017.zip?"
            )
        arc.extract(work, wanted)
    maps = work / "stuffthingmaps_trainval2017"
    with SafeArchive(archives["cocostuff_stuffthingmaps_trainval2017"]) as arc:
        arc.extract(maps, {f"train2017/{i}.png" for i in ids} & set(arc.members))
    return {"images": work / "train2017", "maps": maps / "train2017", "captions": captions}


def _coco_stuff171_train_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    captions = _load_caption_file(paths["captions"])
    ids = sorted(captions)
    bad = [i for i in ids if not re.fullmatch(r"\d{12}", i)]
    if bad:
        raise PrepareError(f"{paths['captions']}: {bad[:3]} are not COCO image ids (12 digits)")
    # The official prepare_coco_stuff.py: listed stuffthingmaps values -> trainId, every other value -> 255.
    lut = np.full(256, -1, dtype=np.int64)
    lut[:182] = IGNORE  # the 11 COCO ids no annotation uses
    lut[IGNORE] = IGNORE
    lut[np.asarray(classes["stuffthingmaps_values"])] = np.arange(len(classes["names"]))
    for image_id in w.iterate(ids, "coco_stuff171_train"):
        size = w.image(image_id, paths["images"] / f"{image_id}.jpg")
        png = paths["maps"] / f"{image_id}.png"
        label = _lut_apply(_read_index_png(png), lut, png, "COCO-Stuff's 0..181 and 255 (unlabeled)")
        w.label(image_id, label, size, source=png)
    write_captions(w.out, {i: captions[i] for i in ids})
    return _Result(
        ids,
        {
            "label_source": (
                "stuffthingmaps_trainval2017 train2017 PNGs -> the 171 trainIds of the official "
                "datasets/prepare_coco_stuff.py (unused ids and 255 -> 255)"
            ),
            "training_list": (
                f"the keys of the official datasets/captions/train_caption_coco.json (commit "
                f"{sources.SEG4DIFF_COMMIT[:7]}), as register_coco_stuff.py's coco_2017_train_subset_stuff_all_sem_seg"
            ),
            "captions": "captions.json holds the file's CogVLM captions (the official COCO prompt overrides them)",
        },
    )


# ---------------------------------------------------------------------------
# MAGNET's SA-1B training set (sa1b_sa_000020): images and masks halved, masks as COCO RLE
# ---------------------------------------------------------------------------

_SA_NAME = re.compile(r"(?:.*/)?(sa_\d+)\.(jpg|json)$")


class _Sa1bMembers:
    """The sa_<n>.jpg / sa_<n>.json pairs of the SA-1B tar (read in place) or of a folder."""

    def __init__(self, paths: Mapping[str, Any]) -> None:
        self._archive: SafeArchive | None = None
        self._files: dict[tuple[str, str], Any] = {}
        if "tar" in paths:
            self._archive = SafeArchive(paths["tar"])
            names = self._archive.names()
            self.where = str(paths["tar"])
        else:
            names = [p.relative_to(paths["folder"]).as_posix() for p in paths["folder"].rglob("sa_*.*")]
            self.where = str(paths["folder"])
        for rel in names:
            match = _SA_NAME.fullmatch(rel)
            if match:
                self._files[(match.group(1), match.group(2))] = rel if self._archive else paths["folder"] / rel
        images = {i for i, ext in self._files if ext == "jpg"}
        annotations = {i for i, ext in self._files if ext == "json"}
        if not images:
            raise MissingSourceError(f"{self.where} holds no SA-1B image (sa_<n>.jpg); is it an SA-1B shard?")
        unpaired = sorted(images ^ annotations)
        if unpaired:
            raise PrepareError(
                f"{self.where}: {len(unpaired)} SA-1B images or annotations lack their pair (e.g. {unpaired[:3]}); "
                "the shard is incomplete: download it again"
            )
        self.ids = sorted(images, key=lambda i: int(i[3:]))

    def read(self, image_id: str, ext: str) -> bytes:
        where = self._files[(image_id, ext)]
        return self._archive.read_bytes(where) if self._archive else Path(where).read_bytes()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


def _sa1b_sa_000020_locate(raw: Path) -> dict[str, Any]:
    return {
        "folder": raw,
        "captions": _existing_caption_file(raw, "seg4diff_train_caption_sa1b"),
    }


def _sa1b_sa_000020_stage(archives: Mapping[str, Path], work: Path) -> dict[str, Any]:
    # Members are read from the tar one by one: nothing is extracted.
    return {"tar": archives["sa1b_sa_000020"], "captions": archives["seg4diff_train_caption_sa1b"]}


def halved_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) halved and rounded: SA-1B's 2250x1500 becomes 1125x750 (the official datasets/README)."""
    return max(1, int(width / 2 + 0.5)), max(1, int(height / 2 + 0.5))


def _sa1b_one(image_id: str, members: _Sa1bMembers, w: _Writer) -> dict[str, int]:
    from pycocotools import mask as mask_utils

    where = f"{members.where} ({image_id}.json)"
    try:
        record = json.loads(members.read(image_id, "json"))
        info, annotations = record["image"], record["annotations"]
        height, width = int(info["height"]), int(info["width"])
    except (ValueError, KeyError, TypeError) as err:
        raise PrepareError(f"{where} is not an SA-1B annotation file ({err!r})") from err
    try:
        with Image.open(io.BytesIO(members.read(image_id, "jpg"))) as im:
            image = im.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise PrepareError(f"cannot read {members.where} ({image_id}.jpg) ({err}); the shard is corrupt") from err
    if image.size != (width, height):
        raise PrepareError(f"{where} says {width}x{height} but {image_id}.jpg is {image.size[0]}x{image.size[1]} (WxH)")
    new_w, new_h = halved_size(width, height)
    save_image_jpeg(
        w.out / IMAGE_DIR / f"{image_id}.jpg",
        np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8),
        quality=JPEG_QUALITY,
    )
    kept, counts = [], {"masks_in_source": len(annotations), "crowd": 0, "empty_after_halving": 0}
    for ann in annotations:
        if ann.get("iscrowd", 0):  # the official mapper keeps iscrowd == 0 only (SA-1B has none)
            counts["crowd"] += 1
            continue
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, dict) or "counts" not in segmentation:
            raise PrepareError(f"{where}: annotation {ann.get('id')} has no COCO RLE segmentation")
        mask = mask_utils.decode(segmentation)
        if mask.shape != (height, width):
            raise PrepareError(f"{where}: annotation {ann.get('id')} mask is {mask.shape[::-1]}, the image {width}x{height}")
        half = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.Resampling.NEAREST), dtype=np.uint8)
        area = int(half.sum())
        if area == 0:
            counts["empty_after_halving"] += 1  # never a training mask: the official drops empty instances
            continue
        rle = mask_utils.encode(np.asfortranarray(half))
        kept.append({"id": ann.get("id"), "area": area, "segmentation": {"size": [new_h, new_w], "counts": rle["counts"].decode()}})
    kept.sort(key=lambda a: -a["area"])  # stable: equal areas keep the file's order
    atomic_write_json(
        w.out / MASK_DIR / f"{image_id}.json",
        {"image_id": image_id, "height": new_h, "width": new_w, "source_size": [height, width], "annotations": kept},
    )
    return counts


def _sa1b_sa_000020_convert(paths: Mapping[str, Any], w: _Writer, classes: dict) -> _Result:
    captions = _load_caption_file(paths["captions"])
    members = _Sa1bMembers(paths)
    try:
        uncaptioned = [i for i in members.ids if i not in captions]
        ids = [i for i in members.ids if i in captions]
        if not ids:
            raise PrepareError(
                f"none of the {len(members.ids)} images of {members.where} has a caption in {paths['captions']}; "
                "is it the official train_caption_sa1b.json?"
            )
        if uncaptioned:
            log.warning("%d images have no caption in %s and are left out (e.g. %s)", len(uncaptioned),
                        paths["captions"], uncaptioned[:3])
        totals = {"masks_in_source": 0, "crowd": 0, "empty_after_halving": 0}
        (w.out / MASK_DIR).mkdir(parents=True, exist_ok=True)
        with _quiet_pycocotools():
            for image_id in w.iterate(ids, "sa1b_sa_000020"):
                for key, value in _sa1b_one(image_id, members, w).items():
                    totals[key] += value
    finally:
        members.close()
    w.reencoded += len(ids)
    write_captions(w.out, {i: captions[i] for i in ids})
    return _Result(
        ids,
        {
            "label_source": (
                "SA-1B sa_<n>.json COCO RLE masks, decoded with pycocotools, halved (nearest) with their image, "
                "re-encoded as RLE in SAMasks/<id>.json, largest first; the 0.5 % area filter and the largest 32 "
                "are applied at training time on the augmented grid (seg4diff_repro.magnet.data), as the official"
            ),
            "masks": totals,
            "images_without_caption": {"count": len(uncaptioned), "examples": uncaptioned[:10]},
            "assumptions": [
                "[assumption] images without a caption in train_caption_sa1b.json are left out (the official "
                "mapper would give them an empty caption, which its two-sentence truncation cannot split)",
            ],
        },
    )


@dataclass(frozen=True)
class _Handler:
    locate: Callable[[Path], dict[str, Any]]
    stage: Callable[[Mapping[str, Path], Path], dict[str, Any]]
    convert: Callable[[Mapping[str, Any], _Writer, dict], _Result]


HANDLERS: dict[str, _Handler] = {
    "voc21": _Handler(_voc21_locate, _voc21_stage, _voc21_convert),
    "coco_object": _Handler(_coco_object_locate, _coco_object_stage, _coco_object_convert),
    "pc59": _Handler(_pc59_locate, _pc59_stage, _pc59_convert),
    "ade150": _Handler(_ade150_locate, _ade150_stage, _ade150_convert),
    "coco_stuff27": _Handler(_coco_stuff27_locate, _coco_stuff27_stage, _coco_stuff27_convert),
    "cityscapes": _Handler(_cityscapes_locate, _cityscapes_stage, _cityscapes_convert),
    "coco_stuff171_train": _Handler(_coco_stuff171_train_locate, _coco_stuff171_train_stage, _coco_stuff171_train_convert),
    "sa1b_sa_000020": _Handler(_sa1b_sa_000020_locate, _sa1b_sa_000020_stage, _sa1b_sa_000020_convert),
}


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _missing_archive_message(archive: sources.Archive, path: Path) -> str:
    if archive.login_required:
        return f"{path} is missing.\n" + archive.instructions.format(downloads_dir=path.parent)
    return (
        f"archive {path} is missing; download it first (`snakemake {path}` or `seg4diff-repro download "
        f"--archive {archive.key} --dest {path}`), or point data.paths.<dataset> at an existing raw copy"
    )


def prepare_dataset(
    name: str,
    out_dir: str | Path,
    *,
    downloads_dir: str | Path | None = None,
    source_dir: str | Path | None = None,
    expected_count: int | None = None,
    checksums: Mapping[str, tuple[str, str]] | None = None,
    keep_extracted: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare dataset ``name`` into ``out_dir`` (normally ``<data.root>/prepared/<name>``).

    Give either ``downloads_dir`` (the verified archives, by their published file names) or
    ``source_dir`` (an existing raw copy; nothing is downloaded or extracted). ``expected_count``
    replaces the published image count of the split (for tests and subsets); the check runs whenever a count
    is published or given (SA-1B publishes none).
    ``checksums`` overrides published checksums by archive key (mirrors, tests).
    Returns the manifest dict.
    """
    name = sources.resolve_name(name)
    spec = sources.DATASETS[name]
    handler = HANDLERS[name]
    classes = load_class_info(name)
    expected = spec.expected_count if expected_count is None else int(expected_count)
    if (downloads_dir is None) == (source_dir is None):
        raise ValueError("give exactly one of downloads_dir (archives) and source_dir (existing raw copy)")

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    work = out.parent / f".{out.name}.extract"
    # A killed run's extraction folder; its staging folder is cleared by replace_folder_atomically.
    shutil.rmtree(work, ignore_errors=True)

    try:
        with replace_folder_atomically(out, staging=staging):
            if source_dir is not None:
                raw = Path(source_dir)
                if not raw.is_dir():
                    raise MissingSourceError(f"data.paths.{name} = {raw} is not a folder")
                log.info("%s: using the existing raw copy in %s", name, raw)
                paths = handler.locate(raw)
                source_info: dict[str, Any] = {"kind": "existing_copy", "path": str(raw.resolve())}
            else:
                downloads = Path(downloads_dir)
                archive_paths: dict[str, Path] = {}
                archive_info = []
                for archive in sources.archives_for(name):
                    path = downloads / archive.filename
                    if not path.is_file():
                        error = LoginRequiredError if archive.login_required else MissingSourceError
                        raise error(_missing_archive_message(archive, path))
                    checksum = (checksums or {}).get(archive.key, archive.checksum)
                    algo, digest = verify_file(path, checksum, origin=path)
                    if checksum == archive.checksum:  # an override pins another file (a mirror's, a test's)
                        check_git_blob(path, archive)
                    archive_paths[archive.key] = path
                    archive_info.append(
                        {
                            "key": archive.key,
                            "filename": archive.filename,
                            "url": archive.urls[0],
                            "checksum": f"{algo}:{digest}",
                            "checksum_published": archive.checksum is not None and checksum == archive.checksum,
                            "checksum_source": archive.checksum_source if checksum == archive.checksum else "override",
                            **({"git_blob": archive.git_blob} if archive.git_blob and checksum == archive.checksum else {}),
                        }
                    )
                log.info("%s: extracting the needed members into %s", name, work)
                paths = handler.stage(archive_paths, work)
                source_info = {"kind": "archives", "archives": archive_info}

            writer = _Writer(staging, progress)
            result = handler.convert(paths, writer, classes)
            if not result.ids:
                raise PrepareError(f"{name}: no images found in the source")
            if expected is not None and len(result.ids) != expected:
                raise CountMismatchError(
                    f"{name}: the {spec.split} split has {len(result.ids)} images, expected {expected} "
                    f"({'published count' if expected_count is None else 'expected_count'}); the source is "
                    "incomplete or not the official release"
                )
            write_classes_json(
                staging, classes["names"], ignore_index=IGNORE, background_index=classes["background_index"]
            )
            write_split(staging, spec.split, result.ids)
            extra = {
                "dataset": name,
                "title": spec.title,
                "split": spec.split,
                "image_count": len(result.ids),
                "expected_count": expected,
                "expected_count_is_published": spec.expected_count is not None and expected == spec.expected_count,
                "label_convention": classes["source"],
                "source": source_info,
                "reencoded_images": writer.reencoded,
                "prepared_by": "seg4diff_repro.datasets.prepare.prepare_dataset",
                **{k: v for k, v in result.info.items() if k != "assumptions"},
                "assumptions": [*result.info.get("assumptions", []), *spec.notes, *(
                    [classes["note"]] if "note" in classes else []
                )],
            }
            manifest = write_manifest(staging, extra)  # last file written
    except BaseException:
        if not keep_extracted:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not keep_extracted:
        shutil.rmtree(work, ignore_errors=True)
    log.info("%s: prepared %d images in %s", name, len(result.ids), out)
    return manifest
