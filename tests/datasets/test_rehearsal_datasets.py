"""The rehearsal's raw dataset copies go through the real prepare code with the release's conventions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.prepare import load_class_info, prepare_dataset
from seg4diff_repro.datasets.rehearsal import IMAGE_SIZES, write_rehearsal_dataset


@pytest.mark.parametrize("name", sorted(IMAGE_SIZES))
def test_rehearsal_copy_prepares_at_the_release_image_size_with_its_classes(tmp_path, name):
    raw = write_rehearsal_dataset(name, tmp_path / "raw", n_images=2, seed=1)
    manifest = prepare_dataset(name, tmp_path / "prepared", source_dir=raw, expected_count=2, progress=False)
    assert manifest["splits"] == {"val": 2}
    assert manifest["class_names"] == load_class_info(name)["names"]
    dataset = SegmentationDataset(tmp_path / "prepared", "val")
    width, height = IMAGE_SIZES[name]
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.image.shape == (height, width, 3)
        labels = set(np.unique(sample.label).tolist())
        # Every rectangle became a class of the dataset; only the release's ignore value besides.
        classes = labels - {255}
        assert len(classes) >= 2 and max(classes) < len(dataset.class_names)
        if name == "voc21":
            assert 255 in labels  # VOC's boundary band
        if name in ("ade150", "cityscapes", "pc59", "coco_stuff27"):
            assert 255 in labels  # pixels outside the rectangles: ADE 'other', Cityscapes id 0, unlabeled -> ignore


def test_voc_copy_has_palette_labels(tmp_path):
    raw = write_rehearsal_dataset("voc21", tmp_path / "raw", n_images=1)
    label = Image.open(next((raw / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png")))
    assert label.mode == "P"
