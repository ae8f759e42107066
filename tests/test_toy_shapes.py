"""The procedural toy-shapes dataset: layout, determinism, label/caption/colour consistency."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg4diff_repro.datasets import SegmentationDataset, TOY_CLASS_NAMES, generate_toy_shapes

ARGS = dict(n_train=6, n_val=4, image_size=64, seed=3)
# Written independently of the generator: the spec's shape -> colour-word table ...
COLOUR_WORD = {"circle": "red", "square": "blue", "triangle": "green", "star": "yellow"}
# ... and plain named colours to judge decoded pixels against.
NAMED_RGB = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 128, 0), "yellow": (255, 255, 0)}
CLASS_NAMES = ["background", "circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "toy_shapes"
    generate_toy_shapes(root, **ARGS)
    return root


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))}


def test_layout_files_and_manifest(toy_root: Path) -> None:
    ids = {split: (toy_root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split() for split in ("train", "val")}
    assert ids["train"] == [f"toy_train_{i:05d}" for i in range(6)]
    assert ids["val"] == [f"toy_val_{i:05d}" for i in range(4)]
    for image_id in ids["train"] + ids["val"]:
        with Image.open(toy_root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
        with Image.open(toy_root / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.format == "PNG" and im.mode == "P" and im.size == (64, 64)
    classes = json.loads((toy_root / "classes.json").read_text())
    assert classes == {"names": CLASS_NAMES, "ignore_index": 255, "background_index": 0}
    assert list(TOY_CLASS_NAMES) == CLASS_NAMES
    manifest = json.loads((toy_root / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 6, "val": 4}
    assert manifest["extra"]["args"]["seed"] == 3 and manifest["extra"]["args"]["n_train"] == 6
    assert len(manifest["files"]) == 10 + 10 + 2 + 2
    assert not [p for p in toy_root.parent.iterdir() if p.name.startswith(".")]  # temp folder cleaned up


def test_same_seed_is_byte_identical_other_seed_differs(toy_root: Path, tmp_path: Path) -> None:
    generate_toy_shapes(tmp_path / "again", **ARGS)
    assert _all_files(tmp_path / "again") == _all_files(toy_root)
    # Regenerating over an earlier toy-shapes output replaces it.
    generate_toy_shapes(tmp_path / "again", **{**ARGS, "seed": 4})
    other = _all_files(tmp_path / "again")
    assert other.keys() == _all_files(toy_root).keys()
    differing = [k for k in other if k.startswith("JPEGImages/") and other[k] != _all_files(toy_root)[k]]
    assert len(differing) == 10


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_toy_shapes(tmp_path / "mine", n_train=1, n_val=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_regenerates_over_its_output_without_manifest_and_a_killed_runs_staging(toy_root: Path, tmp_path: Path) -> None:
    # Snakemake deletes a rule's output (manifest.json) before it re-runs the rule (--forcerun, a changed
    # toy_shapes key); a killed run leaves its staging folder behind.
    root = tmp_path / "toy_shapes"
    generate_toy_shapes(root, **{**ARGS, "seed": 4})
    (root / "manifest.json").unlink()
    (tmp_path / ".toy_shapes.partial").mkdir()
    (tmp_path / ".toy_shapes.partial" / "half.jpg").write_bytes(b"\xff\xd8")
    generate_toy_shapes(root, **ARGS)
    assert _all_files(root) == _all_files(toy_root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_shapes"]
    # A folder of other classes is still refused, whole.
    other = tmp_path / "other"
    other.mkdir()
    (other / "classes.json").write_text(json.dumps({"names": ["background", "cat"]}))
    with pytest.raises(FileExistsError, match="other.*not a toy-shapes dataset"):
        generate_toy_shapes(other, **ARGS)
    assert [p.name for p in other.iterdir()] == ["classes.json"]


def test_label_values_areas_and_boundary_band(toy_root: Path) -> None:
    for image_id, label in _labels(toy_root).items():
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 2, 3, 4, 255}, image_id
        objects = values - {0, 255}
        assert 1 <= len(objects) <= 3, image_id
        for c in objects:
            assert (label == c).mean() >= 0.08, (image_id, c)  # big enough for 16x16 tokens
        assert 255 in values
        # A 1-pixel ignore band separates every object from anything else: no two 4-adjacent
        # non-ignore pixels carry different labels.
        for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1, :], label[1:, :])):
            touching = (a != 255) & (b != 255) & (a != b)
            assert not touching.any(), image_id
        # ... and the band stays thin (one pixel wide, not a blanket over the objects).
        assert (label == 255).mean() < 0.15, image_id


def test_captions_name_exactly_the_classes_in_the_label_map(toy_root: Path) -> None:
    captions = json.loads((toy_root / "captions.json").read_text())
    labels = _labels(toy_root)
    assert captions.keys() == labels.keys()
    pattern = re.compile(r"^a (\w+) (\w+)(?:(?:, | and )a (\w+) (\w+))*$")
    assert any(c.count(" a ") == 2 for c in captions.values())  # the 3-shape form is exercised
    for image_id, caption in captions.items():
        assert pattern.match(caption), caption
        pairs = re.findall(r"a (\w+) (\w+)", caption)
        present = {CLASS_NAMES[c] for c in np.unique(labels[image_id]) if c not in (0, 255)}
        assert {shape for _, shape in pairs} == present, (image_id, caption)
        assert len(pairs) == len(present)
        for colour, shape in pairs:
            assert COLOUR_WORD[shape] == colour, caption
        if len(pairs) == 3:
            assert ", " in caption and " and " in caption
        # Left-to-right order: compare visible centroids where occlusion cannot swap them.
        xs = [np.nonzero(labels[image_id] == CLASS_NAMES.index(shape))[1].mean() for _, shape in pairs]
        for left, right in zip(xs, xs[1:]):
            assert left < right + 8, (image_id, caption, xs)


def test_decoded_colours_are_nearest_to_their_class_colour(toy_root: Path) -> None:
    labels = _labels(toy_root)
    names = list(NAMED_RGB)
    refs = np.array([NAMED_RGB[n] for n in names], dtype=np.float64)
    checked = 0
    for image_id, label in labels.items():
        rgb = np.array(Image.open(toy_root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"), dtype=np.float64)
        for c in set(np.unique(label).tolist()) - {0, 255}:
            mean = rgb[label == c].mean(axis=0)
            nearest = names[int(np.argmin(np.linalg.norm(refs - mean, axis=1)))]
            assert nearest == COLOUR_WORD[CLASS_NAMES[c]], (image_id, CLASS_NAMES[c], mean)
            checked += 1
        background = rgb[label == 0].mean(axis=0)
        assert background.min() > 170 and np.ptp(rgb[label == 0], axis=0).max() < 80  # light, low contrast
    assert checked >= 10


def test_reader_roundtrip_and_voc20_view(toy_root: Path) -> None:
    captions = json.loads((toy_root / "captions.json").read_text())
    ds = SegmentationDataset(toy_root, "val")
    assert len(ds) == 4 and ds.class_names == CLASS_NAMES
    view = SegmentationDataset(toy_root, "val", background="drop")
    assert view.class_names == ["circle", "square", "triangle", "star"] and view.background_index is None
    for sample, dropped in zip(ds, view):
        raw = np.array(Image.open(toy_root / "SegmentationClass" / f"{sample.image_id}.png")).astype(np.int64)
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.label.dtype == np.int64
        np.testing.assert_array_equal(sample.label, raw)
        assert sample.caption == captions[sample.image_id]
        np.testing.assert_array_equal(dropped.label[raw == 0], 255)
        np.testing.assert_array_equal(dropped.label[raw == 255], 255)
        obj = (raw != 0) & (raw != 255)
        np.testing.assert_array_equal(dropped.label[obj], raw[obj] - 1)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="max_shapes"):
        generate_toy_shapes("/nonexistent/never", max_shapes=5)
    with pytest.raises(ValueError, match="image_size"):
        generate_toy_shapes("/nonexistent/never", image_size=4)
