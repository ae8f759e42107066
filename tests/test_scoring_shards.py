"""Resumable scoring: shards survive a killed run, stale ones are recomputed, and the merge equals one pass."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
from seg4diff_repro.datasets import generate_toy_shapes
from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline
from seg4diff_repro.segmentation.score import ScoringSettings, score_layers, score_unsupervised


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_tiny_sd3_pipeline(root / "model", seed=0)
    generate_toy_shapes(root / "data", n_train=1, n_val=5, seed=3)
    common = dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(root / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[0, 2], seed=0, short_side=None, resize="stretch", background_name="background",
        split="val", limit=None,
    )
    oracle = ExtractionSettings.from_dict({**common, "prompt": "oracle", "background": "drop"})
    null = ExtractionSettings.from_dict({**common, "prompt": "null", "background": "class", "pad_multiple": 32})
    extract_attention(oracle, root / "data", root / "oracle", batch_size=5)
    extract_attention(null, root / "data", root / "null", batch_size=5)
    return root


def test_killed_scoring_resumes_with_its_finished_shards(caches, tmp_path, caplog):
    shards = tmp_path / "per_layer.shards"
    manifest, data = caches / "oracle" / "manifest.json", caches / "data"
    first = score_layers(manifest, data, ScoringSettings(), shards, shard_size=2)
    folders = sorted(shards.iterdir())
    assert [f.name for f in folders] == ["shard_00000", "shard_00001", "shard_00002"]
    stamps = {f.name: (f / "shard.json").stat().st_mtime_ns for f in folders}
    # As if the run had been killed while writing the second shard: it is gone, its staging folder left behind.
    staged = shards / ".shard_00001.staging"
    (folders[1]).rename(staged)
    (staged / "layer_000.npz").write_bytes(b"truncated")
    with caplog.at_level(logging.INFO):
        resumed = score_layers(manifest, data, ScoringSettings(), shards, shard_size=2)
    assert "1 of 3 shards to compute (2 kept" in caplog.text
    assert not staged.exists()
    assert all((shards / name / "shard.json").stat().st_mtime_ns == stamp
               for name, stamp in stamps.items() if name != "shard_00001")
    assert resumed.equals(first)

    # The merged shards equal one pass over all images, and other settings never reuse a shard.
    whole = score_layers(manifest, data, ScoringSettings(), tmp_path / "whole.shards", shard_size=100)
    np.testing.assert_allclose(whole[["pACC", "mACC", "mIoU"]], first[["pACC", "mACC", "mIoU"]])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        score_layers(manifest, data, ScoringSettings(norm_after_merge=True), shards, shard_size=2)
    assert "3 of 3 shards to compute" in caplog.text


def test_unsupervised_scoring_resumes_and_checks_the_geometry(caches, tmp_path, caplog):
    manifest, data = caches / "null" / "manifest.json", caches / "data"
    shards = tmp_path / "scores.shards"
    first = score_unsupervised(manifest, data, shards, kl_threshold=0.01, shard_size=2)
    assert set(first["geometry"]) == {"official"}
    assert (first["mean_proposals"] > 1).all()
    (shards / "shard_00002" / "shard.json").unlink()
    with caplog.at_level(logging.INFO):
        again = score_unsupervised(manifest, data, shards, kl_threshold=0.01, shard_size=2)
    assert "1 of 3 shards to compute" in caplog.text
    assert again.equals(first)
    with pytest.raises(ValueError, match="pad_multiple=32.*'aligned' needs None"):
        score_unsupervised(manifest, data, tmp_path / "aligned.shards", geometry="aligned")


def _official_ovss_miou(cache_dir, dataset, ignore_label):
    """The official open-vocabulary route restated with torch (seg4diff_model_ovss.py:164-253, detectron2's
    SemSegEvaluator): per class the mean of the slice [st, st + n) of the 77 columns, a zero tensor over the
    vocabulary, bilinear upsampling, torch argmax; GT == ignore_label dropped; IoU over classes with GT pixels."""
    import torch
    import torch.nn.functional as F

    from seg4diff_repro.attention.cache import read_cached_image

    n = len(dataset.class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    predicted_background_on_objects = 0
    for sample in dataset:
        cached = read_cached_image(cache_dir, sample.image_id)
        window = torch.full((cached.i2t.shape[1], 77), float("nan"), dtype=torch.float64)
        window[:, torch.as_tensor(cached.columns)] = torch.as_tensor(cached.i2t[0].astype(np.float64))
        full = torch.zeros(n, *cached.token_grid, dtype=torch.float64)
        for class_id, (start, end) in zip(cached.class_ids.tolist(), cached.spans.tolist()):
            full[class_id] = window[:, start:end].mean(dim=-1).reshape(cached.token_grid)
        label = sample.label
        prediction = F.interpolate(full[None], size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        prediction = prediction.numpy()
        keep = label != ignore_label
        keep &= label != dataset.ignore_index
        predicted_background_on_objects += int(np.sum(prediction[keep] == 0))
        confusion += np.bincount(n * label[keep] + prediction[keep], minlength=n * n).reshape(n, n)
    gt = confusion.sum(axis=1)
    iou = np.diag(confusion)[gt > 0] / (gt + confusion.sum(axis=0) - np.diag(confusion))[gt > 0]
    return 100 * iou.mean(), predicted_background_on_objects


def test_coco_object_view_prompts_background_and_ignores_its_pixels(caches, tmp_path):
    """Issue 11 item 1: background is a prompt word and an argmax candidate; only scoring ignores GT background."""
    from seg4diff_repro.attention.cache import read_cached_image
    from seg4diff_repro.datasets import SegmentationDataset

    common = dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(caches / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[2], seed=0, short_side=None, resize="stretch", background_name="background",
        split="val", limit=None, prompt="oracle",
    )
    out = tmp_path / "object"
    extract_attention(ExtractionSettings.from_dict({**common, "background": "ignore"}), caches / "data", out, batch_size=5)
    dataset = SegmentationDataset(caches / "data", "val", background="ignore")
    prompts = [read_cached_image(out, s.image_id).prompt for s in dataset]
    assert all(p.split()[0] == "background" for p in prompts)  # toy-shapes images all show background (index 0)
    scores = score_layers(out / "manifest.json", caches / "data", ScoringSettings(), tmp_path / "s.shards")
    expected, background_wins = _official_ovss_miou(out, dataset, ignore_label=0)
    assert background_wins > 0  # background takes object pixels, which the dropped-background view never allows
    assert scores["mIoU"].iloc[0] == pytest.approx(expected)
    assert scores["background"].iloc[0] == "ignore" and scores["overflow_images"].iloc[0] == 0


def test_voc21_view_puts_background_last_in_every_prompt(caches, tmp_path):
    """Issue 11 item 2: the official voc21.json has background at index 20, so prompts end with it."""
    from seg4diff_repro.attention.cache import read_cached_image
    from seg4diff_repro.datasets import SegmentationDataset

    common = dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(caches / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[2], seed=0, short_side=None, resize="stretch", background_name="background",
        split="val", limit=None, prompt="oracle",
    )
    out = tmp_path / "voc21"
    extract_attention(ExtractionSettings.from_dict({**common, "background": "last"}), caches / "data", out, batch_size=5)
    dataset = SegmentationDataset(caches / "data", "val", background="last")
    for sample in dataset:
        cached = read_cached_image(out, sample.image_id)
        words = cached.prompt.split()
        assert words[-1] == "background" and "background" not in words[:-1]
        assert cached.class_ids[-1] == len(dataset.class_names) - 1
        objects = sorted({int(v) for v in np.unique(sample.label)} - {255, len(dataset.class_names) - 1})
        assert words[:-1] == [dataset.class_names[c] for c in objects]


def test_unsupervised_scores_both_matchings_and_the_official_class_count(caches, tmp_path):
    """Issue 11 items 3-4: per-row (official) and per-image mIoU side by side; scored_classes drops labels >= N."""
    manifest, data = caches / "null" / "manifest.json", caches / "data"
    rows = score_unsupervised(manifest, data, tmp_path / "a.shards", kl_threshold=0.01)
    assert (rows["matching"] == "per_row").all()
    np.testing.assert_allclose(rows["mIoU"], rows["mIoU_per_row"])
    assert (rows["mIoU_per_row"] != rows["mIoU_per_image"]).all()  # 64 px rows vs whole images differ here
    per_image = score_unsupervised(manifest, data, tmp_path / "b.shards", kl_threshold=0.01, matching="per_image")
    np.testing.assert_allclose(per_image["mIoU"], rows["mIoU_per_image"])
    fewer = score_unsupervised(manifest, data, tmp_path / "c.shards", kl_threshold=0.01, scored_classes=4)
    assert (fewer["scored_classes"] == 4).all() and (fewer["out_of_range_pixels"] > 0).all()  # class 4 dropped
    assert (rows["out_of_range_pixels"] == 0).all()
    with pytest.raises(ValueError, match="scored_classes=9"):
        score_unsupervised(manifest, data, tmp_path / "d.shards", kl_threshold=0.01, scored_classes=9)


def test_a_cache_of_an_older_format_is_refused_with_what_to_do(caches, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(caches / "oracle", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["settings"]["cache_format"] = 2  # untruncated spans and the background views came with format 3
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format 2, but this version reads format 3: re-run its extraction rule"):
        score_layers(old / "manifest.json", caches / "data", ScoringSettings(), tmp_path / "s.shards")
