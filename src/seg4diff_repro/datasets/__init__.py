"""Prepared segmentation datasets: the common on-disk layout, its reader, and the toy-shapes generator."""

from .layout import (
    Sample,
    SegmentationDataset,
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    save_image_jpeg,
    save_label_png,
    voc_palette,
    write_captions,
    write_classes_json,
    write_manifest,
    write_split,
)
from .toy_shapes import TOY_CLASS_NAMES, TOY_CLASSES, ToyClass, generate_toy_shapes

__all__ = [
    "TOY_CLASSES",
    "TOY_CLASS_NAMES",
    "Sample",
    "SegmentationDataset",
    "ToyClass",
    "atomic_write_bytes",
    "atomic_write_json",
    "generate_toy_shapes",
    "read_manifest",
    "save_image_jpeg",
    "save_label_png",
    "voc_palette",
    "write_captions",
    "write_classes_json",
    "write_manifest",
    "write_split",
]
