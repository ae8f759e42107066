"""Download (real code, local server) + prepare every dataset from archives with the real member layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ds_support import (
    ADE_VAL,
    CITY_VAL,
    COCO_IMAGES,
    EXPECTED,
    VOC_VAL,
    ade_zip,
    dataset_files,
    sha256,
    tar_bytes,
    voc2012_tar,
)
from PIL import Image

from seg4diff_repro.cli_datasets import main as cli_main
from seg4diff_repro.datasets import SegmentationDataset, read_manifest, sources
from seg4diff_repro.datasets.download import (
    ArchiveError,
    ChecksumMismatchError,
    LoginRequiredError,
    UnsafeArchiveError,
    download,
)
from seg4diff_repro.datasets.prepare import CountMismatchError, LabelValueError, prepare_dataset

FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}


def fetch(server, tmp_path: Path, name: str, files: dict[str, bytes] | None = None) -> dict:
    """Serve the dataset's archives, download them with the real code; returns checksum overrides."""
    files = files or dataset_files(name)
    downloads = tmp_path / "data" / "downloads"
    checksums = {}
    for archive in sources.archives_for(name):
        data = files[archive.filename]
        url = server.add(archive.filename, data)
        download(url, downloads / archive.filename, sha256(data), **FAST)
        checksums[archive.key] = sha256(data)
    return checksums


def prepared(tmp_path: Path, name: str) -> Path:
    return tmp_path / "data" / "prepared" / name


def run_prepare(tmp_path, name, checksums, **kw):
    kw.setdefault("expected_count", EXPECTED[name])
    return prepare_dataset(
        name, prepared(tmp_path, name), downloads_dir=tmp_path / "data" / "downloads", checksums=checksums,
        progress=False, **kw,
    )


def labels(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
        assert im.mode == "P"
        return np.asarray(im)


def assert_only_final_output(tmp_path: Path, name: str) -> None:
    """No staging or extraction leftovers next to the prepared folder."""
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == [name]


# Expected label of the first column pattern of each dataset's test labels.
@pytest.mark.parametrize("name", ["voc21", "coco_object", "pc59", "ade150", "coco_stuff27", "cityscapes"])
def test_download_and_prepare_success(server, tmp_path, name):
    checksums = fetch(server, tmp_path, name)
    manifest = run_prepare(tmp_path, name, checksums)
    root = prepared(tmp_path, name)
    assert_only_final_output(tmp_path, name)
    assert read_manifest(root) == manifest
    extra = manifest["extra"]
    assert manifest["splits"] == {"val": EXPECTED[name]} and extra["image_count"] == EXPECTED[name]
    assert [a["checksum"] for a in extra["source"]["archives"]] == [":".join(c) for c in checksums.values()]
    classes = json.loads((root / "classes.json").read_text())
    assert classes["ignore_index"] == 255 and classes["names"] == manifest["class_names"]
    ds = SegmentationDataset(root, "val")
    assert len(ds) == EXPECTED[name]
    for sample in ds:  # the reader validates sizes and label values
        assert sample.image.shape[:2] == sample.label.shape
    check = CHECKS[name]
    check(root, ds)


def _voc(root, ds):
    assert ds.ids == VOC_VAL and ds.class_names[0] == "background" and ds.class_names[11] == "diningtable"
    assert labels(root, VOC_VAL[0])[0, :4].tolist() == [0, 15, 255, 2]
    voc20 = SegmentationDataset(root, "val", background="drop")  # the VOC20 view
    assert voc20.class_names[0] == "aeroplane" and len(voc20.class_names) == 20
    assert voc20[0].label[0, :4].tolist() == [255, 14, 255, 1]
    # Only the val members were extracted, and the JPEGs are copied bit-exactly.
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == VOC_VAL


def _coco_object(root, ds):
    assert ds.ids == [Path(f).stem for _, f in COCO_IMAGES]
    assert len(ds.class_names) == 81 and ds.background_index == 0
    first = labels(root, "000000000139")
    assert first[0, 0] == ds.class_names.index("person")
    assert first[2, 2] == ds.class_names.index("dog") and first[0, 7] == 0  # small dog on top of the person
    crowd = labels(root, "000000000285")
    assert crowd[5, 9] == ds.class_names.index("toothbrush") and crowd[0, 0] == 0
    assert read_manifest(root)["extra"]["reencoded_images"] == 1  # the greyscale JPEG became RGB
    with Image.open(root / "JPEGImages" / "000000000632.jpg") as im:
        assert im.mode == "RGB"


def _pc59(root, ds):
    assert ds.ids == ["2008_000002", "2008_000003"] and ds.background_index == 0 and len(ds.class_names) == 60
    lab = labels(root, "2008_000002")
    assert lab[0, 0] == ds.class_names.index("sky") == 47 and lab[5, 0] == ds.class_names.index("aeroplane") == 1
    assert lab[5, 11] == 0  # no 59-class annotation: background
    pc59 = SegmentationDataset(root, "val", background="drop")  # the open-vocabulary PC59 view, as before
    assert pc59.class_names[0] == "aeroplane" and len(pc59.class_names) == 59
    assert pc59[0].label[0, 0] == 46 and pc59[0].label[5, 0] == 0 and pc59[0].label[5, 11] == 255


def _ade150(root, ds):
    assert ds.ids == ADE_VAL
    assert labels(root, ADE_VAL[0])[0, :4].tolist() == [255, 0, 149, 7]
    assert ds.class_names[7] == "bed "


def _coco_stuff27(root, ds):
    names = ds.class_names
    assert labels(root, "000000000139")[0, :4].tolist() == [
        names.index("person-things"), names.index("textile-stuff"), names.index("sky-stuff"), 255]


def _cityscapes(root, ds):
    assert ds.ids == sorted(i for _, i in CITY_VAL)
    assert labels(root, "frankfurt_000000_000294")[0, :5].tolist() == [0, 13, 255, 18, 255]
    assert read_manifest(root)["extra"]["reencoded_images"] == 2  # PNG -> JPEG


CHECKS = {"voc21": _voc, "coco_object": _coco_object, "pc59": _pc59, "ade150": _ade150,
          "coco_stuff27": _coco_stuff27, "cityscapes": _cityscapes}


def test_count_check_uses_the_published_count_unless_overridden(server, tmp_path):
    checksums = fetch(server, tmp_path, "voc21")
    with pytest.raises(CountMismatchError, match="has 3 images, expected 1449"):
        prepare_dataset("voc21", prepared(tmp_path, "voc21"), downloads_dir=tmp_path / "data" / "downloads",
                        checksums=checksums, progress=False)
    with pytest.raises(CountMismatchError, match="expected 4"):
        run_prepare(tmp_path, "voc21", checksums, expected_count=4)
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == []


def test_bad_label_value_fails_with_the_file_name(server, tmp_path):
    files = {"VOCtrainval_11-May-2012.tar": voc2012_tar(bad_label=42)}
    checksums = fetch(server, tmp_path, "voc21", files)
    with pytest.raises(LabelValueError, match=rf"SegmentationClass/{VOC_VAL[1]}\.png: label values \[42\]"):
        run_prepare(tmp_path, "voc21", checksums)
    assert sorted((tmp_path / "data" / "prepared").iterdir()) == []

    files = {"ADEChallengeData2016.zip": ade_zip(bad_label=151)}
    server.state.files.clear()
    checksums = fetch(server, tmp_path, "ade150", files)
    with pytest.raises(LabelValueError, match=rf"{ADE_VAL[0]}\.png: label values \[151\]"):
        run_prepare(tmp_path, "ade150", checksums)


def test_corrupt_download_is_refused_and_nothing_is_marked_done(server, tmp_path):
    data = voc2012_tar()
    server.add("VOCtrainval_11-May-2012.tar", data[: len(data) // 2])  # truncated on the server
    dest = tmp_path / "data" / "downloads" / "VOCtrainval_11-May-2012.tar"
    with pytest.raises(ChecksumMismatchError, match="VOCtrainval_11-May-2012.tar"):
        download(server.url("VOCtrainval_11-May-2012.tar"), dest, sha256(data), **FAST)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("cut", [15000, 30000])
def test_corrupt_archive_with_matching_checksum_gives_archive_error(server, tmp_path, cut):
    data = voc2012_tar()[:cut]  # e.g. a mirror that published a truncated file and its checksum
    checksums = fetch(server, tmp_path, "voc21", {"VOCtrainval_11-May-2012.tar": data})
    with pytest.raises(ArchiveError, match=r"VOCtrainval_11-May-2012\.tar (is truncated|is corrupt)"):
        run_prepare(tmp_path, "voc21", checksums)
    assert not prepared(tmp_path, "voc21").exists()
    assert sorted((tmp_path / "data" / "prepared").iterdir()) == []


def test_archive_changed_after_download_is_removed(server, tmp_path):
    checksums = fetch(server, tmp_path, "ade150")
    archive = tmp_path / "data" / "downloads" / "ADEChallengeData2016.zip"
    archive.write_bytes(archive.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumMismatchError, match="ADEChallengeData2016.zip: expected sha256"):
        run_prepare(tmp_path, "ade150", checksums)
    assert not archive.exists()


def test_archive_with_dotdot_member_is_refused(server, tmp_path):
    good = {"VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"x\n"}
    evil = tar_bytes({**good, "VOCdevkit/VOC2012/../../../evil.sh": b"echo pwned"})
    checksums = fetch(server, tmp_path, "voc21", {"VOCtrainval_11-May-2012.tar": evil})
    with pytest.raises(UnsafeArchiveError, match=r"VOCtrainval_11-May-2012\.tar: member 'VOCdevkit/VOC2012/\.\..*contains '\.\.'"):
        run_prepare(tmp_path, "voc21", checksums)
    assert not list(tmp_path.rglob("evil.sh"))
    assert sorted((tmp_path / "data" / "prepared").iterdir()) == []


def test_existing_copy_is_used_without_downloading(server, tmp_path):
    checksums = fetch(server, tmp_path, "voc21")
    from seg4diff_repro.datasets.download import safe_extract

    copy = tmp_path / "my_voc"
    safe_extract(tmp_path / "data" / "downloads" / "VOCtrainval_11-May-2012.tar", copy)
    manifest = prepare_dataset("voc21", tmp_path / "p" / "voc21", source_dir=copy, expected_count=3, progress=False)
    assert manifest["extra"]["source"] == {"kind": "existing_copy", "path": str(copy.resolve())}
    assert manifest["splits"] == {"val": 3}
    assert checksums  # (the archive was only used to build the copy)


def test_cityscapes_without_archives_explains_the_login(tmp_path, capsys):
    with pytest.raises(LoginRequiredError, match=r"(?s)gtFine_trainvaltest\.zip is missing.*cityscapes-dataset\.com"):
        prepare_dataset("cityscapes", tmp_path / "prepared" / "cityscapes", downloads_dir=tmp_path / "dl",
                        progress=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["download", "--archive", "cityscapes_leftimg8bit_trainvaltest", "--downloads-dir",
                  str(tmp_path / "dl")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "leftImg8bit_trainvaltest.zip is missing" in err and str(tmp_path / "dl") in err
    assert "data.paths.cityscapes" in err and "Traceback" not in err


def test_cli_download_and_prepare(server, tmp_path):
    files = dataset_files("ade150")
    data = files["ADEChallengeData2016.zip"]
    url = server.add("ADEChallengeData2016.zip", data)
    checksum = ":".join(sha256(data))
    root = tmp_path / "data"
    cli_main(["download", "--archive", "ade20k_challenge", "--downloads-dir", str(root / "downloads"),
              "--url", url, "--checksum", checksum, "--backoff", "0", "--no-progress"])
    cli_main(["prepare-dataset", "--name", "ade150", "--data-root", str(root), "--expected-count", "2",
              "--checksum", f"ade20k_challenge={checksum}", "--no-progress"])
    assert read_manifest(root / "prepared" / "ade150")["splits"] == {"val": 2}
    with pytest.raises(SystemExit) as exit_:  # the published checksum does not match the test archive
        cli_main(["prepare-dataset", "--name", "ade150", "--data-root", str(root), "--expected-count", "2",
                  "--no-progress"])
    assert exit_.value.code == 1
