"""MAGNET's training data: the COCO-Stuff-171 training list and SA-1B preparation (real archive formats, the real
download code against a local server, SA-1B's tar placed by hand), and magnet/data.py's official preprocessing
(the top-left 640 crop quirk, the 0.5 % / largest-32 mask filter, prompts, seeding) checked against hand-built
cases and direct slicing of the prepared arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "datasets"))
from ds_support import LocalServer, jpeg, png_index, sha256, tar_bytes, zip_bytes  # noqa: E402

from seg4diff_repro.cli_datasets import main as cli_main  # noqa: E402
from seg4diff_repro.datasets import SegmentationDataset, generate_toy_shapes, sources  # noqa: E402
from seg4diff_repro.datasets.download import LoginRequiredError, download  # noqa: E402
from seg4diff_repro.datasets.layout import (  # noqa: E402
    save_image_jpeg,
    save_label_png,
    write_captions,
    write_classes_json,
    write_manifest,
    write_split,
)
from seg4diff_repro.datasets.prepare import PrepareError, git_blob_id, prepare_dataset  # noqa: E402
from seg4diff_repro.magnet.data import (  # noqa: E402
    CocoProtocolMaskDataset,
    MagnetSizes,
    Sa1bMaskDataset,
    example_generator,
    resize_shortest_edge_shape,
    select_sa1b_masks,
    toy_mask_dataset,
    two_sentence_prompt,
)

FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}


@pytest.fixture
def server():
    srv = LocalServer()
    try:
        yield srv
    finally:
        srv.close()


def fetch(server: LocalServer, downloads: Path, files: dict[str, bytes]) -> dict[str, tuple[str, str]]:
    """Serve ``files`` (published name -> bytes), download each with the real code; returns checksum overrides."""
    checksums = {}
    for filename, data in files.items():
        download(server.add(filename, data), downloads / filename, sha256(data), **FAST)
        checksums[sources.archive_by_filename(filename).key] = sha256(data)
    return checksums


# ---------------------------------------------------------------------------
# COCO-Stuff-171 on the official training list
# ---------------------------------------------------------------------------

LISTED = ["000000000110", "000000000144", "000000000165"]
UNLISTED = "000000000009"  # in train2017.zip but not in the training list
W, H = 12, 8


def coco_train_files() -> dict[str, bytes]:
    # stuffthingmaps values (COCO-Stuff id - 1): 0 person, 11 street sign (an id no annotation uses), 91 banner,
    # 156 sky-other, 181 wood, 255 unlabeled.
    label = np.tile(np.array([0, 11, 91, 156, 181, 255] * 2), (H, 1))
    images = {f"train2017/{i}.jpg": jpeg(k) for k, i in enumerate([*LISTED, UNLISTED])}
    maps = {f"train2017/{i}.png": png_index(label, mode="L") for i in [*LISTED, UNLISTED]}
    maps["val2017/000000000139.png"] = png_index(label, mode="L")
    captions = {i: f"Caption of {i}. Second sentence. Third." for i in LISTED}
    return {
        "train2017.zip": zip_bytes(images),
        "stuffthingmaps_trainval2017.zip": zip_bytes(maps),
        "train_caption_coco.json": json.dumps(captions).encode(),
    }


def test_coco_training_set_is_the_listed_images_with_the_171_class_labels(server, tmp_path):
    downloads = tmp_path / "downloads"
    checksums = fetch(server, downloads, coco_train_files())
    out = tmp_path / "prepared" / "coco_stuff171_train"
    manifest = prepare_dataset("coco_stuff171_train", out, downloads_dir=downloads, checksums=checksums,
                               expected_count=3, progress=False)
    assert manifest["splits"] == {"train": 3}
    ds = SegmentationDataset(out, "train")
    assert ds.ids == LISTED  # the unlisted image is left out
    assert len(ds.class_names) == 171 and ds.background_index is None
    # COCO-Stuff ids 1 person, 92 banner, 157 sky-other, 182 wood (the published id list); 12 street sign is unused.
    expected = [ds.class_names.index(n) for n in ("person",)] + [255] + [
        ds.class_names.index(n) for n in ("banner", "sky-other", "wood")] + [255]
    assert ds[0].label[0, :6].tolist() == expected
    assert json.loads((out / "captions.json").read_text())[LISTED[0]].startswith("Caption of")
    # The published count of the official list is 10,001: three images are refused without the override.
    with pytest.raises(Exception, match="has 3 images, expected 10001"):
        prepare_dataset("coco_stuff171_train", tmp_path / "p2", downloads_dir=downloads, checksums=checksums,
                        progress=False)


def test_git_blob_id_is_gits_object_id_and_a_foreign_caption_file_is_refused(tmp_path):
    path = tmp_path / "train_caption_coco.json"
    path.write_bytes(b'{"000000000110": "Not the official file."}')
    reference = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_blob_id(path) == reference.stdout.strip()
    # An existing raw copy with a caption file other than the official one fails, naming both ids and the URL.
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "000000000110.jpg").write_bytes(jpeg(0))
    (tmp_path / "train2017" / "000000000110.png").write_bytes(png_index(np.zeros((H, W)), mode="L"))
    archive = sources.ARCHIVES["seg4diff_train_caption_coco"]
    with pytest.raises(PrepareError, match=rf"(?s){reference.stdout.strip()}.*{archive.git_blob}.*{archive.urls[0]}"):
        prepare_dataset("coco_stuff171_train", tmp_path / "out", source_dir=tmp_path, expected_count=1, progress=False)


# ---------------------------------------------------------------------------
# SA-1B: the tar placed by hand, masks as COCO RLE
# ---------------------------------------------------------------------------

SA_W, SA_H = 40, 30  # a real shard's images are 2250x1500; halved: 20x15
# (top, left, height, width) in the full-size image, all even so that halving is exact.
SA_BOXES = {
    "sa_1": [(0, 0, 30, 20), (0, 20, 10, 10), (20, 30, 2, 2), (10, 30, 4, 6)],
    "sa_2": [(2, 2, 8, 8)],
}
SA_CAPTIONS = {"sa_1": "A photo of a street. Cars park on the left. A tree.", "sa_2": "One sentence. Two."}


def sa1b_tar() -> bytes:
    from pycocotools import mask as mask_utils

    members = {}
    for n, (image_id, boxes) in enumerate(SA_BOXES.items()):
        annotations = []
        for k, (top, left, height, width) in enumerate(boxes):
            mask = np.zeros((SA_H, SA_W), dtype=np.uint8)
            mask[top: top + height, left: left + width] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({"id": 10 * n + k, "area": int(mask.sum()), "bbox": [left, top, width, height],
                                "segmentation": {"size": [SA_H, SA_W], "counts": rle["counts"].decode()},
                                "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[left, top]],
                                "crop_box": [0, 0, SA_W, SA_H]})
        record = {"image": {"image_id": n + 1, "width": SA_W, "height": SA_H, "file_name": f"{image_id}.jpg"},
                  "annotations": annotations}
        members[f"./{image_id}.jpg"] = jpeg(n, size=(SA_W, SA_H))  # the shards name members "./sa_<n>.*"
        members[f"./{image_id}.json"] = json.dumps(record).encode()
    return tar_bytes(members)


def test_missing_sa1b_tar_says_where_to_get_it_and_where_to_put_it(tmp_path, capsys):
    downloads = tmp_path / "downloads"
    with pytest.raises(LoginRequiredError, match=rf"(?s){downloads / 'sa_000020.tar'} is missing.*"
                                                 r"ai\.meta\.com/datasets/segment-anything-downloads.*"
                                                 rf"{downloads}/"):
        prepare_dataset("sa1b_sa_000020", tmp_path / "prepared", downloads_dir=downloads, progress=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["download", "--archive", "sa1b_sa_000020", "--downloads-dir", str(downloads)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert str(downloads / "sa_000020.tar") in err and "segment-anything-downloads" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under NumPy 2
def test_sa1b_prepared_from_a_placed_tar_with_the_sha256_recorded(server, tmp_path, caplog):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    tar = sa1b_tar()
    (downloads / "sa_000020.tar").write_bytes(tar)  # what the user places after accepting the licence
    with caplog.at_level(logging.WARNING):
        cli_main(["download", "--archive", "sa1b_sa_000020", "--downloads-dir", str(downloads)])
    digest = hashlib.sha256(tar).hexdigest()
    record = json.loads((downloads / "sa_000020.tar.verified").read_text())
    assert record["digest"] == digest and record["trusted_on_first_use"] is True
    assert "no checksum is published" in caplog.text and digest in caplog.text

    checksums = fetch(server, downloads, {"train_caption_sa1b.json": json.dumps(SA_CAPTIONS).encode()})
    out = tmp_path / "prepared" / "sa1b_sa_000020"
    manifest = prepare_dataset("sa1b_sa_000020", out, downloads_dir=downloads, checksums=checksums, progress=False)
    assert manifest["splits"] == {"train": 2} and manifest["extra"]["expected_count"] is None
    tar_entry = manifest["extra"]["source"]["archives"][0]
    assert tar_entry["checksum"] == f"sha256:{digest}" and tar_entry["checksum_published"] is False
    assert manifest["extra"]["masks"]["masks_in_source"] == 5
    with Image.open(out / "JPEGImages" / "sa_1.jpg") as im:
        assert im.size == (SA_W // 2, SA_H // 2)
    from pycocotools import mask as mask_utils

    masks = json.loads((out / "SAMasks" / "sa_1.json").read_text())
    assert (masks["height"], masks["width"], masks["source_size"]) == (15, 20, [SA_H, SA_W])
    boxes = sorted(SA_BOXES["sa_1"], key=lambda b: -b[2] * b[3])  # largest first
    for ann, (top, left, height, width) in zip(masks["annotations"], boxes, strict=True):
        expected = np.zeros((15, 20), dtype=np.uint8)
        expected[top // 2: (top + height) // 2, left // 2: (left + width) // 2] = 1
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle), expected) and ann["area"] == expected.sum()
    assert sorted(f"sa_{k}" for k in (1, 2)) == sorted(json.loads((out / "captions.json").read_text()))


def test_sa1b_examples_follow_the_official_mapper(server, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "sa_000020.tar").write_bytes(sa1b_tar())
    checksums = fetch(server, downloads, {"train_caption_sa1b.json": json.dumps(SA_CAPTIONS).encode()})
    out = tmp_path / "sa1b"
    prepare_dataset("sa1b_sa_000020", out, downloads_dir=downloads, checksums=checksums, progress=False)
    # Halved 20x15 -> shorter side 30 gives 40x30 (under max 45) -> padded to a multiple of 8: 40x32.
    sizes = MagnetSizes(image_size=16, short_edge=30, max_size=45, crop=30, official_crop=20, size_divisibility=8)
    ds = Sa1bMaskDataset(out, image_size=16, sizes=sizes, seed=3)
    # Expected masks on the padded 32x40 grid: the full-size boxes (halved, then doubled by nearest), largest
    # first; the 2x2 box (4 px = 0.31 % of 1280) is at most 0.5 % and dropped.
    expected = []
    for top, left, height, width in sorted(SA_BOXES["sa_1"], key=lambda b: -b[2] * b[3])[:3]:
        m = np.zeros((32, 40), dtype=np.float32)
        m[top: top + height, left: left + width] = 1
        expected.append(m)
    expected = np.stack(expected)
    flips = set()
    for seed in range(12):
        example = ds.example(0, example_generator(seed, 0))
        assert example.image.shape == (3, 16, 16) and example.class_names is None
        assert example.prompt == "A photo of a street. Cars park on the left."
        masks = example.masks.numpy()
        flipped = np.array_equal(masks, expected[:, :, ::-1])  # 40 px wide: the flip happens before the padding
        assert flipped or np.array_equal(masks, expected)
        flips.add(flipped)
    assert flips == {True, False}  # the flip is drawn from the generator


def test_sa1b_mask_filter_matches_a_hand_built_case():
    grid_area = 10 * 20  # 200 px: 0.5 % is 1 px, so a mask must have at least 2 pixels
    areas = [1, 0, 2, 150, 3, 3, *range(4, 40)]  # 42 masks; two of area 3 tie
    kept = select_sa1b_masks(np.array(areas), grid_area, min_area_fraction=0.005, max_masks=32)
    # By hand: drop the areas 1 and 0; sort the other 40 largest first; keep 32: 150, 39, 38, ..., 9.
    assert [areas[k] for k in kept] == [150, *range(39, 8, -1)]
    assert kept[0] == 3 and kept[1] == len(areas) - 1
    # Ties keep the file's order; below 32 masks nothing is cut.
    assert select_sa1b_masks(np.array([3, 3, 1, 5]), grid_area).tolist() == [3, 0, 1]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under NumPy 2
def test_sa1b_masks_equal_decoding_every_mask_at_a_fractional_scale(tmp_path):
    """Masks too small to pass are not decoded: the result equals decoding, resizing and filtering all of them."""
    from pycocotools import mask as mask_utils

    root, rng = tmp_path / "sa", np.random.default_rng(4)
    stored = []
    for k in range(40):  # rectangles from 1 px up, many near the threshold
        mask = np.zeros((15, 20), dtype=np.uint8)
        height, width = rng.integers(1, 4 if k < 37 else 12, size=2)
        top, left = rng.integers(0, 15 - height + 1), rng.integers(0, 20 - width + 1)
        mask[top: top + height, left: left + width] = 1
        stored.append(mask)
    annotations = [{"id": k, "area": int(m.sum()), "segmentation": {
        "size": [15, 20], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode()}}
        for k, m in sorted(enumerate(stored), key=lambda km: -int(km[1].sum()))]
    save_image_jpeg(root / "JPEGImages" / "sa_7.jpg", rng.integers(0, 255, (15, 20, 3), dtype=np.uint8))
    (root / "SAMasks").mkdir()
    (root / "SAMasks" / "sa_7.json").write_text(json.dumps(
        {"image_id": "sa_7", "height": 15, "width": 20, "source_size": [30, 40], "annotations": annotations}))
    write_split(root, "train", ["sa_7"])
    write_classes_json(root, ["object"], background_index=None)
    write_captions(root, {"sa_7": "One. Two."})
    write_manifest(root, {"generator": "test"})
    # 20x15 -> 29x22 (scale 22/15: not an integer) -> padded to 32x24 (768 px; 0.5 % is 3.84 px).
    sizes = MagnetSizes(image_size=16, short_edge=22, max_size=100, crop=22, official_crop=20, size_divisibility=8)
    order = [ann["id"] for ann in annotations]
    resized = [np.asarray(Image.fromarray(stored[k]).resize((29, 22), Image.Resampling.NEAREST)) for k in order]
    areas = np.array([int(m.sum()) for m in resized])
    passing = [k for k in np.argsort(-areas, kind="stable") if areas[k] / 768 > 0.005]
    # Masks of at most 3 stored pixels (0.39 % of 768 at most) pass after the resize, others of 1 px do not.
    assert any(ann["area"] <= 3 and k in passing for k, ann in enumerate(annotations))
    assert any(ann["area"] == 1 and k not in passing for k, ann in enumerate(annotations))
    # At 6 the cut falls inside a tie (four masks of 20 px), which the stored order (largest first) decides.
    assert areas[passing[5]] == 20 and sum(areas[k] == 20 for k in passing[:6]) < (areas == 20).sum()
    for max_masks in (6, 40):
        ds = Sa1bMaskDataset(root, image_size=16, sizes=sizes, max_masks=max_masks)
        keep = passing[:max_masks]
        expected = np.zeros((len(keep), 24, 32), dtype=np.float32)
        expected[:, :22, :29] = np.stack([resized[k] for k in keep])
        flipped = expected.copy()
        flipped[:, :22, :29] = expected[:, :22, :29][:, :, ::-1]
        results = [ds.example(0, example_generator(seed, 0)).masks.numpy() for seed in range(6)]
        assert all(np.array_equal(r, expected) or np.array_equal(r, flipped) for r in results)
        assert any(np.array_equal(r, flipped) for r in results) and any(np.array_equal(r, expected) for r in results)


def test_two_sentence_prompt_is_the_official_expression():
    assert two_sentence_prompt("A cat sits. On a mat. In a house.") == "A cat sits. On a mat."
    assert two_sentence_prompt("A cat sits.") == "A cat sits.."  # the official expression, kept as written
    with pytest.raises(ValueError, match="no '.'"):
        two_sentence_prompt("a cat", where="caption of sa_9")


# ---------------------------------------------------------------------------
# The COCO protocol: crop, flip, the top-left 640 quirk, prompts
# ---------------------------------------------------------------------------

NAMES = ["person", "traffic light", "sky-other", "wood"]


def small_coco(tmp_path: Path) -> Path:
    """A prepared 48x32 image: person left, traffic light right, sky-other in the bottom rows of the columns every
    crop keeps (so outside the top-left 20x20 whatever the crop), wood a band along the top, ignore one column."""
    root = tmp_path / "coco_small"
    label = np.zeros((32, 48), dtype=np.uint8)
    label[:, 24:] = 1
    label[24:, 16:32] = 2
    label[:2, :] = 3
    label[:, 10] = 255
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    save_image_jpeg(root / "JPEGImages" / "a.jpg", image)
    save_label_png(root / "SegmentationClass" / "a.png", label)
    write_split(root, "train", ["a"])
    write_classes_json(root, NAMES, background_index=None)
    write_captions(root, {"a": "A street. A light. More."})
    write_manifest(root, {"generator": "test"})
    return root


def crops(label: np.ndarray, size: int) -> list[tuple[int, bool, np.ndarray]]:
    """Every (left offset, flip, square crop) the random crop and flip can give on a landscape label."""
    out = []
    for left in range(label.shape[1] - size + 1):
        crop = label[:size, left: left + size]
        out += [(left, False, crop), (left, True, crop[:, ::-1])]
    return out


def present(label: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(label) if c != 255]


def test_coco_official_crop_is_the_top_left_of_the_random_crop(tmp_path):
    root = small_coco(tmp_path)
    sizes = MagnetSizes(image_size=32, short_edge=32, max_size=64, crop=32, official_crop=20, size_divisibility=4)
    official = CocoProtocolMaskDataset(root, image_size=32, sizes=sizes, coco_crop="official")
    whole = CocoProtocolMaskDataset(root, image_size=32, sizes=sizes, coco_crop="none")
    sample = SegmentationDataset(root, "train")[0]
    seen = set()
    for seed in range(16):
        a = official.example(0, example_generator(seed, 0))
        b = whole.example(0, example_generator(seed, 0))
        # "none": the masks are one of the possible crops of the label, and the image the same crop /255
        # (32 is already a multiple of 4 and S = 32, so the stretch is the identity).
        matches = [(left, flip, crop) for left, flip, crop in crops(sample.label, 32)
                   if present(crop) == [NAMES.index(n) for n in b.class_names]
                   and np.array_equal(b.masks.numpy(), np.stack([crop == c for c in present(crop)]))]
        assert matches, f"seed {seed}: the masks are no crop of the label"
        left, flip, crop = matches[0]
        image = sample.image[:32, left: left + 32][:, ::-1 if flip else 1].astype(np.float32) / 255
        assert torch.allclose(b.image, torch.from_numpy(image.copy()).permute(2, 0, 1), atol=1e-6)
        seen.add((left, flip))
        # "official": the top-left 20x20 of the same crop (the same draws), classes re-read from it.
        top_left = crop[:20, :20]
        assert a.masks.shape == (len(present(top_left)), 20, 20)
        assert np.array_equal(a.masks.numpy(), np.stack([top_left == c for c in present(top_left)]))
        assert a.class_names == [NAMES[c] for c in present(top_left)]
        assert "sky-other" in b.class_names and "sky-other" not in a.class_names  # only outside the top-left
        assert a.prompt == " ".join(NAMES[c] for c in present(top_left))  # full names, ascending index
        assert a.image.shape == (3, 32, 32)
    assert len({flip for _, flip in seen}) == 2 and len({left for left, _ in seen}) > 2


def test_coco_prompt_switch_and_bad_settings(tmp_path):
    root = small_coco(tmp_path)
    ds = CocoProtocolMaskDataset(root, image_size=32, prompt="caption")
    assert ds[0].prompt == "A street. A light."
    with pytest.raises(ValueError, match="coco_crop='top-left'"):
        CocoProtocolMaskDataset(root, coco_crop="top-left")
    with pytest.raises(FileNotFoundError, match="prepare_nowhere"):
        CocoProtocolMaskDataset(tmp_path / "nowhere")


def test_examples_are_determined_by_seed_epoch_and_index(tmp_path):
    root = small_coco(tmp_path)
    first = CocoProtocolMaskDataset(root, image_size=32, seed=5)
    again = CocoProtocolMaskDataset(root, image_size=32, seed=5)
    a, b = first[0], again[0]
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks) and a.prompt == b.prompt
    assert torch.equal(first.example(0, example_generator(9, 0)).image, again.example(0, example_generator(9, 0)).image)
    # Other seeds or epochs draw other crops (the 48x32 image has 17 offsets and 2 flips).
    images = set()
    for seed in range(8):
        images.add(CocoProtocolMaskDataset(root, image_size=32, seed=seed)[0].image.numpy().tobytes())
        first.set_epoch(seed)
        images.add(first[0].image.numpy().tobytes())
    assert len(images) > 3


def test_official_sizes_scale_with_the_model_resolution():
    assert MagnetSizes.scaled(1024) == MagnetSizes()
    # 64 px: 1024, 1333, 1024, 640, 32 times 1/16.
    small = MagnetSizes.scaled(64)
    assert (small.short_edge, small.max_size, small.crop, small.official_crop, small.size_divisibility) == (
        64, 83, 64, 40, 2)
    assert small.record()["scale"] == 0.0625 and small.record()["official"]["official_crop"] == 640
    # detectron2's ResizeShortestEdge: SA-1B's halved 1125x750 -> 1536x1024 > 1333 -> 1333x889.
    assert resize_shortest_edge_shape(750, 1125, 1024, 1333) == (889, 1333)
    assert resize_shortest_edge_shape(480, 640, 1024, None) == (1024, 1365)


def test_toy_shapes_train_split_as_a_coco_protocol_set(tmp_path):
    root = tmp_path / "toy_shapes"
    generate_toy_shapes(root, n_train=3, n_val=1, image_size=64, seed=0)
    ds = toy_mask_dataset(root, seed=1)
    assert len(ds) == 3 and ds.record()["sizes"]["official_crop"] == 40
    labels = SegmentationDataset(root, "train", background="drop")
    for index in range(3):
        example = ds[index]
        assert example.image.shape == (3, 64, 64) and example.masks.shape[1:] == (40, 40)
        label = labels[index].label
        candidates = [label[:40, :40], label[:, ::-1][:40, :40]]  # no resize or crop at 64 px; flip or not
        assert any(present(c) == [labels.class_names.index(n) for n in example.class_names]
                   and np.array_equal(example.masks.numpy(), np.stack([c == k for k in present(c)]))
                   for c in candidates if present(c))
        assert "background" not in example.class_names
        assert example.prompt == " ".join(example.class_names)


def test_snakemake_dry_run_lists_the_training_sets_jobs(tmp_path):
    from test_snakemake import _harness, _snakemake

    wd = _harness(tmp_path, {"root": "data", "paths": {}})
    run = _snakemake(wd, "-n", "-p", "prepare_coco_stuff171_train", "prepare_sa1b_sa_000020")
    assert run.returncode == 0, run.stderr + run.stdout
    out = run.stdout + run.stderr
    for filename in ("train2017.zip", "stuffthingmaps_trainval2017.zip", "train_caption_coco.json", "sa_000020.tar",
                     "train_caption_sa1b.json"):
        assert f"--dest data/downloads/{filename}" in out, filename
    assert "seg4diff-repro prepare-dataset --name sa1b_sa_000020 --out data/prepared/sa1b_sa_000020" in out
