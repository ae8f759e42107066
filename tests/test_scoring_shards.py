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
    oracle = ExtractionSettings.from_dict({**common, "prompt": "oracle", "drop_background": True})
    null = ExtractionSettings.from_dict({**common, "prompt": "null", "drop_background": False, "pad_multiple": 32})
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
