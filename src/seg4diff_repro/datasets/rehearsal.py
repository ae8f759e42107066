"""Small raw copies of the real evaluation datasets, for a rehearsal of the paper run without downloads.

Each folder has the on-disk layout of the published release (the layout `data.paths.<name>` accepts), the real
class list and label conventions (VOC palette PNGs with the 255 boundary band, COCO instance polygons with the
real category ids, the PASCAL-Context Detail-API json with its 459-class ids, ADE20K's 0 = "other", COCO-Stuff's
0..181 stuffthingmaps, Cityscapes' labelIds) and the real images' sizes, but only a few random-texture images
with rectangles of a few classes each. The pipeline's own prepare rules turn them into the prepared layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from seg4diff_repro.datasets.layout import voc_palette
from seg4diff_repro.datasets.prepare import load_class_info

# Image sizes (width, height) of each release's typical val image.
IMAGE_SIZES = {
    "voc21": (500, 375),
    "coco_object": (640, 480),
    "pc59": (500, 375),
    "ade150": (683, 512),
    "coco_stuff27": (640, 480),
    "cityscapes": (2048, 1024),
}
REHEARSAL_DATASETS = tuple(IMAGE_SIZES)


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def _boxes(rng: np.random.Generator, size: tuple[int, int], n: int) -> list[tuple[int, int, int, int]]:
    """``n`` rectangles (top, left, bottom, right), each at least a quarter of the shorter side."""
    width, height = size
    boxes = []
    for _ in range(n):
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        boxes.append((int(top), int(left), int(top + h), int(left + w)))
    return boxes


def _label(size: tuple[int, int], boxes, values, fill: int) -> np.ndarray:
    width, height = size
    label = np.full((height, width), fill, dtype=np.uint8)
    for (top, left, bottom, right), value in zip(boxes, values):
        label[top:bottom, left:right] = value
    return label


def _voc_boundary(label: np.ndarray) -> np.ndarray:
    """VOC's 255 'void' band where the class changes (a few pixels wide, as in SegmentationClass)."""
    edges = np.zeros(label.shape, dtype=bool)
    edges[:-1] |= label[:-1] != label[1:]
    edges[:, :-1] |= label[:, :-1] != label[:, 1:]
    for _ in range(2):
        edges[1:] |= edges[:-1]
        edges[:, 1:] |= edges[:, :-1]
    return np.where(edges, 255, label).astype(np.uint8)


def _save_png(label: np.ndarray, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label, mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette(voc_palette())
    image.save(path)


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def _polygon(box) -> list[list[float]]:
    top, left, bottom, right = box
    return [[left, top, right, top, right, bottom, left, bottom]]


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def write_rehearsal_dataset(name: str, root: Path, n_images: int = 3, seed: int = 0) -> Path:
    """Write ``n_images`` val images of dataset ``name`` in its release's raw layout under ``root``; return ``root``."""
    if name not in IMAGE_SIZES:
        raise ValueError(f"no rehearsal layout for dataset {name!r}; known: {sorted(IMAGE_SIZES)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    size = IMAGE_SIZES[name]
    classes = load_class_info(name)
    pending: list = []  # (image, annotations) of the json-annotated sets, written at the end
    for k in range(n_images):
        boxes = _boxes(rng, size, 2 + k % 2)
        image = _image(rng, size)
        if name == "voc21":
            image_id = f"2007_{k:06d}"
            values = rng.choice(np.arange(1, 21), len(boxes), replace=False)
            _save_jpeg(image, root / f"VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg")
            _save_png(_voc_boundary(_label(size, boxes, values, 0)),
                      root / f"VOCdevkit/VOC2012/SegmentationClass/{image_id}.png", palette=True)
        elif name in ("coco_object", "coco_stuff27"):
            image_id = f"{139 + k:012d}"
            _save_jpeg(image, root / f"val2017/{image_id}.jpg")
            if name == "coco_stuff27":
                values = rng.choice(np.arange(0, 182), len(boxes), replace=False)  # stuffthingmaps: COCO-Stuff id - 1
                _save_png(_label(size, boxes, values, 255), root / f"stuffthingmaps_trainval2017/val2017/{image_id}.png")
        elif name == "pc59":
            image_id = f"2008_{k:06d}"
            _save_jpeg(image, root / f"VOCdevkit/VOC2010/JPEGImages/{image_id}.jpg")
        elif name == "ade150":
            image_id = f"ADE_val_{k + 1:08d}"
            values = rng.choice(np.arange(1, 151), len(boxes), replace=False)
            _save_jpeg(image, root / f"ADEChallengeData2016/images/validation/{image_id}.jpg")
            _save_png(_label(size, boxes, values, 0), root / f"ADEChallengeData2016/annotations/validation/{image_id}.png")
        else:  # cityscapes
            city = ("frankfurt", "lindau", "munster")[k % 3]
            image_id = f"{city}_000000_{k:06d}"
            label_ids = rng.choice([int(v) for v in classes["label_id_to_train_id"]], len(boxes), replace=False)
            path = root / f"leftImg8bit/val/{city}/{image_id}_leftImg8bit.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            _save_png(_label(size, boxes, label_ids, 0), root / f"gtFine/val/{city}/{image_id}_gtFine_labelIds.png")
        _annotations(name, classes, k, image_id, size, boxes, rng, pending)
    _finish(name, root, n_images, pending)
    return root


def _annotations(name, classes, k, image_id, size, boxes, rng, pending: list) -> None:
    width, height = size
    if name == "coco_object":
        categories = rng.choice(classes["coco_category_ids"], len(boxes), replace=False)
        pending.append((
            {"id": int(image_id), "file_name": f"{image_id}.jpg", "height": height, "width": width},
            [{"image_id": int(image_id), "category_id": int(c), "iscrowd": 0, "segmentation": _polygon(b),
              "area": float((b[2] - b[0]) * (b[3] - b[1])), "bbox": [b[1], b[0], b[3] - b[1], b[2] - b[0]]}
             for b, c in zip(boxes, categories)],
        ))
    elif name == "pc59":
        categories = rng.choice(classes["context_category_ids"], len(boxes), replace=False)
        detail_id = 2008000000 + k
        annos = []
        for box, category in zip(boxes, categories):
            mask = _label(size, [box], [1], 0)
            annos.append({"image_id": detail_id, "category_id": int(category), "segmentation": _rle(mask),
                          "area": int(mask.sum())})
        pending.append((
            {"image_id": detail_id, "file_name": f"{image_id}.jpg", "phase": "val", "height": height, "width": width},
            annos,
        ))


def _finish(name: str, root: Path, n_images: int, pending: list) -> None:
    if name == "voc21":
        ids = [f"2007_{k:06d}" for k in range(n_images)]
        split = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{i}\n" for i in ids))
    elif name == "coco_object":
        classes = load_class_info(name)
        categories = [{"id": c, "name": n, "supercategory": "x"}
                      for c, n in zip(classes["coco_category_ids"], classes["names"][1:])]
        annotations = [dict(a, id=i + 1) for i, a in enumerate(a for _, anns in pending for a in anns)]
        instances = {"info": {}, "licenses": [], "images": [img for img, _ in pending], "annotations": annotations,
                     "categories": categories}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations/instances_val2017.json").write_text(json.dumps(instances))
    elif name == "pc59":
        annos = [dict(a, id=i + 1) for i, a in enumerate(a for _, anns in pending for a in anns)]
        detail = {"info": {}, "images": [img for img, _ in pending], "annos_segmentation": annos, "categories": [],
                  "annos_occlusion": [], "annos_joints": [], "parts": []}
        (root / "trainval_merged.json").write_text(json.dumps(detail))
    elif name == "ade150":
        ade = root / "ADEChallengeData2016"
        (ade / "objectInfo150.txt").write_text("Idx\tRatio\n")
        (ade / "sceneCategories.txt").write_text("")
