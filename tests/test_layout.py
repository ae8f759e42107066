"""The prepared-dataset layout: writers, manifest, reader, VOC20 view and error messages."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg4diff_repro.datasets import (
    SegmentationDataset,
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
from seg4diff_repro.datasets.layout import DamagedFileError

REPO = Path(__file__).resolve().parents[1]

NAMES = ["background", "cat", "dog"]


def _make_dataset(root: Path, background_index: int | None = 0) -> dict[str, np.ndarray]:
    """Three 12x16 images with hand-made labels; returns the labels by id."""
    labels = {}
    for k, image_id in enumerate(["a", "b", "c"]):
        label = np.zeros((12, 16), dtype=np.uint8)
        label[2:6, 3:9] = 1
        label[7:11, 8 + k : 14] = 2
        label[0, :] = 255
        labels[image_id] = label
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", label)
        image = np.full((12, 16, 3), 40 * k, dtype=np.uint8)
        save_image_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
    write_classes_json(root, NAMES, ignore_index=255, background_index=background_index)
    write_split(root, "train", ["a", "b"])
    write_split(root, "val", ["c"])
    write_captions(root, {"a": "a cat", "c": "a dog"})
    write_manifest(root, {"source": "hand-made"})
    return labels


def test_voc_palette_matches_published_voc_colours() -> None:
    pal = voc_palette()
    assert len(pal) == 768
    colour = {i: tuple(pal[3 * i : 3 * i + 3]) for i in (0, 1, 2, 15, 20, 255)}
    # Colours of PASCAL VOC's SegmentationClass PNGs (background, aeroplane, bicycle, person, tvmonitor, void).
    assert colour == {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }


def test_label_png_is_palette_png_with_raw_indices(tmp_path: Path) -> None:
    labels = _make_dataset(tmp_path)
    with Image.open(tmp_path / "SegmentationClass" / "a.png") as im:
        assert im.format == "PNG" and im.mode == "P"
        assert im.getpalette()[3:6] == [128, 0, 0]
        np.testing.assert_array_equal(np.array(im), labels["a"])
        rgb = np.array(im.convert("RGB"))
    assert tuple(rgb[0, 0]) == (224, 224, 192)  # ignore row renders as VOC's void colour


def test_reader_roundtrip_captions_and_limit(tmp_path: Path) -> None:
    labels = _make_dataset(tmp_path)
    ds = SegmentationDataset(tmp_path, "train")
    assert ds.ids == ["a", "b"] and len(ds) == 2
    assert ds.class_names == NAMES and ds.background_index == 0 and ds.ignore_index == 255
    samples = list(ds)
    assert [s.image_id for s in samples] == ["a", "b"]
    s = samples[1]
    assert s.image.shape == (12, 16, 3) and s.image.dtype == np.uint8
    assert s.label.shape == (12, 16) and s.label.dtype == np.int64
    np.testing.assert_array_equal(s.label, labels["b"])
    assert np.abs(s.image.astype(int) - 40).max() <= 2  # JPEG of a flat grey image
    assert samples[0].caption == "a cat" and s.caption is None
    limited = SegmentationDataset(tmp_path, "train", limit=1)
    assert limited.ids == ["a"]


def test_drop_background_view(tmp_path: Path) -> None:
    labels = _make_dataset(tmp_path)
    ds = SegmentationDataset(tmp_path, "val", background="drop")
    assert ds.class_names == ["cat", "dog"] and ds.background_index is None
    raw = labels["c"].astype(np.int64)
    expected = np.select([raw == 0, raw == 255], [255, 255], raw - 1)
    np.testing.assert_array_equal(ds[0].label, expected)
    assert set(np.unique(ds[0].label)) == {0, 1, 255}
    np.testing.assert_array_equal(ds.label_for_scoring(ds[0].label), expected)


def test_background_last_view_is_the_official_voc21_order(tmp_path: Path) -> None:
    """Official voc21.json / prepare_voc.py: background -> 20 (last), class k -> k - 1."""
    labels = _make_dataset(tmp_path)
    ds = SegmentationDataset(tmp_path, "val", background="last")
    assert ds.class_names == ["cat", "dog", "background"] and ds.background_index == 2
    raw = labels["c"].astype(np.int64)
    official = {0: 2, 1: 0, 2: 1, 255: 255}  # clsID_to_trID_bg of prepare_voc.py, for three classes
    np.testing.assert_array_equal(ds[0].label, np.vectorize(official.get)(raw))
    np.testing.assert_array_equal(ds.label_for_scoring(ds[0].label), ds[0].label)


def test_background_ignore_view_keeps_background_in_the_label_but_not_in_scoring(tmp_path: Path) -> None:
    """Official COCO-Object open vocabulary: background stays class 0 (a prompt word), GT 0 is ignore_label."""
    labels = _make_dataset(tmp_path)
    ds = SegmentationDataset(tmp_path, "val", background="ignore")
    assert ds.class_names == NAMES and ds.background_index == 0
    raw = labels["c"].astype(np.int64)
    np.testing.assert_array_equal(ds[0].label, raw)  # the prompt sees background
    np.testing.assert_array_equal(ds.label_for_scoring(ds[0].label), np.where(raw == 0, 255, raw))


@pytest.mark.parametrize("mode", ["drop", "last", "ignore"])
def test_background_view_without_background_is_an_error(tmp_path: Path, mode: str) -> None:
    _make_dataset(tmp_path, background_index=None)
    with pytest.raises(ValueError, match="background_index null"):
        SegmentationDataset(tmp_path, "val", background=mode)


def test_unknown_background_view_is_an_error(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    with pytest.raises(ValueError, match="'class', 'last', 'ignore', 'drop'"):
        SegmentationDataset(tmp_path, "val", background="first")


def test_manifest_hashes_and_counts(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["splits"] == {"train": 2, "val": 1}
    assert manifest["class_names"] == NAMES and manifest["ignore_index"] == 255
    assert manifest["extra"] == {"source": "hand-made"}
    on_disk = sorted(
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    assert len(on_disk) == 3 + 3 + 2 + 2  # images, labels, split files, classes + captions
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest, rel


def test_atomic_write_json_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    assert path.stat().st_mode & 0o044  # readable by others like a normal file, not mkstemp's 0600


WORKFLOW_RULES = "\n".join(path.read_text() for path in (REPO / "workflow/rules").glob("*.smk"))


def test_missing_root_classes_and_split_mention_prepare_target(tmp_path: Path) -> None:
    root = tmp_path / "voc21"  # a prepared dataset's folder: data/prepared/<name>, written by rule prepare_<name>
    # A plain `snakemake prepare_<name>` does nothing while manifest.json exists: the hint forces the rule.
    with pytest.raises(FileNotFoundError, match=r"voc21.*`snakemake --forcerun prepare_voc21`.*data\.paths\.voc21"):
        SegmentationDataset(root)
    _make_dataset(root)
    with pytest.raises(FileNotFoundError,
                       match=r"test\.txt.*available splits: \['train', 'val'\].*`snakemake --forcerun prepare_voc21`"):
        SegmentationDataset(root, "test")
    (root / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"classes\.json.*`snakemake --forcerun prepare_voc21`"):
        SegmentationDataset(root)
    # The rule the hints force is the workflow's, and it writes that folder.
    rule = re.search(r"^rule prepare_voc21:\n(.*?)\n\n", WORKFLOW_RULES, flags=re.MULTILINE | re.DOTALL)
    assert rule and 'output:\n        DS_ROOT / "prepared" / "voc21" / "manifest.json"' in rule.group(1), rule
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)


def test_missing_label_names_file_and_split(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    (tmp_path / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        SegmentationDataset(tmp_path, "train")
    assert "SegmentationClass/b.png" in str(err.value) and "train.txt" in str(err.value)
    SegmentationDataset(tmp_path, "val")  # other splits are unaffected


@pytest.mark.parametrize("damaged", ["JPEGImages/a.jpg", "SegmentationClass/a.png"])
def test_damaged_image_or_label_names_the_file_and_the_rebuild(tmp_path: Path, damaged: str) -> None:
    root = tmp_path / "voc21"
    _make_dataset(root)
    raw = (root / damaged).read_bytes()
    (root / damaged).write_bytes(raw[: len(raw) // 2])  # as a copy cut short by a full disk or a kill
    with pytest.raises(DamagedFileError) as err:  # PIL alone says "image file is truncated", naming no file
        SegmentationDataset(root, "train")[0]
    assert str(root / damaged) in str(err.value) and "`snakemake --forcerun prepare_voc21`" in str(err.value)
    assert isinstance(err.value, OSError)
    SegmentationDataset(root, "train")[1]  # the other image is unaffected


def test_bad_label_value_and_size_mismatch(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    bad = np.zeros((12, 16), dtype=np.uint8)
    bad[3, 3] = 9
    save_label_png(tmp_path / "SegmentationClass" / "a.png", bad)
    with pytest.raises(ValueError, match=r"a\.png.*\[9\].*0\.\.2"):
        SegmentationDataset(tmp_path, "train")[0]
    save_label_png(tmp_path / "SegmentationClass" / "b.png", np.zeros((10, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"b\.jpg.*b\.png"):
        SegmentationDataset(tmp_path, "train")[1]


def test_writers_reject_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicates"):
        write_classes_json(tmp_path, ["a", "a"], background_index=None)
    with pytest.raises(ValueError, match="collides"):
        write_classes_json(tmp_path, ["a", "b"], ignore_index=1, background_index=None)
    with pytest.raises(ValueError, match="duplicate"):
        write_split(tmp_path, "val", ["x", "x"])
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "l.png", np.full((2, 2), 300))
