"""The extraction stage: resumes per image, recomputes on a changed setting, caches what the recorder gives."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest

from seg4diff_repro.attention import AttentionRecorder
from seg4diff_repro.attention.cache import cache_path, read_cached_image
from seg4diff_repro.attention.extract import (
    ExtractionSettings, extract_attention, extract_shard, gather_shards, image_seed, parse_shard, shard_positions,
)
from seg4diff_repro.datasets import SegmentationDataset, generate_toy_shapes
from seg4diff_repro.models.preprocess import prepare_image
from seg4diff_repro.models.sd3 import SD3Adapter
from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    write_tiny_sd3_pipeline(root / "model", seed=0)
    generate_toy_shapes(root / "data", n_train=1, n_val=4, seed=5)
    return root


def settings_for(world, **changes) -> ExtractionSettings:
    values = dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(world / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[1, 3], seed=0, short_side=None, resize="stretch", prompt="oracle",
        background_name="background", split="val", background="drop", limit=None,
    )
    return ExtractionSettings.from_dict({**values, **changes})


def test_interrupted_extraction_resumes_and_a_changed_setting_recomputes(world, tmp_path, caplog):
    out = tmp_path / "cache"
    settings = settings_for(world)
    manifest = extract_attention(settings, world / "data", out, batch_size=3)
    files = {image_id: cache_path(out, image_id) for image_id in manifest["image_ids"]}
    stamps = {image_id: path.stat().st_mtime_ns for image_id, path in files.items()}
    lost = manifest["image_ids"][2]
    files[lost].unlink()  # as if the run had been killed before this image ...
    half_written = files[lost].with_name(f".{files[lost].name}.k2x9.tmp")  # ... while atomic_write_bytes wrote it
    half_written.write_bytes(b"PK\x03\x04")
    with caplog.at_level(logging.INFO):
        extract_attention(settings, world / "data", out, batch_size=3)
    assert "1 of 4 images to extract" in caplog.text
    assert files[lost].is_file() and not half_written.exists()
    assert all(files[i].stat().st_mtime_ns == stamps[i] for i in stamps if i != lost)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        extract_attention(settings_for(world, seed=1), world / "data", out, batch_size=3)
    assert "4 of 4 images to extract" in caplog.text


def test_new_weights_or_new_data_at_the_same_path_recompute_every_image(world, tmp_path, caplog):
    """The key holds the model's and the dataset's contents, not their paths."""
    shutil.copytree(world / "model", tmp_path / "model")
    shutil.copytree(world / "data", tmp_path / "data")
    out = tmp_path / "cache"
    settings = settings_for(world, source=str(tmp_path / "model"))
    first = extract_attention(settings, tmp_path / "data", out, batch_size=4)
    assert first["inputs"]["model_fingerprint"].startswith("sha256:")

    def planned() -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            manifest = extract_attention(settings, tmp_path / "data", out, batch_size=4)
        return re.search(r"(\d+ of \d+) images to extract", caplog.text).group(1), manifest

    assert planned()[0] == "0 of 4"
    shutil.rmtree(tmp_path / "model")
    write_tiny_sd3_pipeline(tmp_path / "model", seed=1)  # rebuilt with another seed
    done, manifest = planned()
    assert done == "4 of 4" and manifest["inputs"]["model_fingerprint"] != first["inputs"]["model_fingerprint"]
    shutil.rmtree(tmp_path / "data")
    generate_toy_shapes(tmp_path / "data", n_train=1, n_val=4, seed=6)  # regenerated with another seed
    done, manifest = planned()
    assert done == "4 of 4" and manifest["inputs"]["dataset_fingerprint"] != first["inputs"]["dataset_fingerprint"]
    assert planned()[0] == "0 of 4"


def test_cache_holds_the_recorders_maps_of_the_class_tokens(world, tmp_path):
    out = tmp_path / "cache"
    settings = settings_for(world)
    extract_attention(settings, world / "data", out, batch_size=2)
    dataset = SegmentationDataset(world / "data", "val", background="drop")
    sample = dataset[1]
    cached = read_cached_image(out, sample.image_id)
    # The same forward pass done by hand, batch of one.
    adapter = SD3Adapter.from_pretrained(world / "model")
    noising = adapter.noising(8, 28)
    pixels, _ = prepare_image(sample.image, adapter.image_size)
    latents = adapter.noise_latents(adapter.encode_images(pixels[None]), noising, [image_seed(0, sample.image_id)])
    embeds, pooled = adapter.encode_prompts([cached.prompt])
    with AttentionRecorder(adapter.transformer, layers=[1, 3], heads="mean", record=("i2t", "logits")) as rec:
        adapter.forward(latents, noising, embeds, pooled)
    assert cached.seed == image_seed(0, sample.image_id)
    for position, layer in enumerate((1, 3)):
        expected = rec.i2t[layer][0, 0][:, cached.columns].numpy()
        np.testing.assert_allclose(cached.i2t[position].astype(np.float32), expected, rtol=2e-3, atol=1e-6)
        expected_logits = rec.logits_i2t[layer][0, 0][:, cached.columns].numpy()
        np.testing.assert_allclose(cached.logits[position].astype(np.float32), expected_logits, rtol=2e-3, atol=2e-3)
    # The stored columns are exactly the class words' token positions, starting after <sos>.
    assert cached.columns[0] == 1
    assert cached.columns.tolist() == sorted({p for start, end in cached.spans for p in range(start, end)})


def test_shards_partition_the_images_into_contiguous_near_equal_runs():
    runs = [list(shard_positions(7, (i, 3))) for i in (1, 2, 3)]
    assert runs == [[0, 1], [2, 3], [4, 5, 6]]  # by hand: floor(7 i / 3) for i = 0..3 gives 0, 2, 4, 7
    assert [list(shard_positions(2, (i, 4))) for i in (1, 2, 3, 4)] == [[], [0], [], [1]]
    assert parse_shard("3-of-8") == (3, 8)
    for bad in ("0-of-2", "3-of-2", "1of2", "a-of-b"):
        with pytest.raises(ValueError, match="use '<i>-of-<n>'"):
            parse_shard(bad)


def test_sharded_extraction_gathers_into_the_unsharded_caches(world, tmp_path, caplog):
    """Two shards of a two-timestep run, run one after the other as two jobs would, give the manifests and maps
    of one unsharded run; a shard re-run after a kill recomputes only its own missing image; gathering refuses
    a gap."""
    from seg4diff_repro.attention.extract import TimestepCache

    def caches(root):
        return [TimestepCache(settings_for(world), root / "t8"), TimestepCache(settings_for(world, timestep=4), root / "t4")]

    whole = [extract_attention(c.settings, world / "data", c.out_dir, batch_size=4) for c in caches(tmp_path / "whole")]
    out = caches(tmp_path / "sharded")
    shards = [extract_shard(out, world / "data", (i, 2), batch_size=1, device="cpu") for i in (1, 2)]
    assert [s["caches"][0]["image_ids"] for s in shards] == [whole[0]["image_ids"][:2], whole[0]["image_ids"][2:]]
    manifests = gather_shards(shards[::-1], world / "data")  # the order of the inputs does not matter
    for cache, manifest, reference in zip(out, manifests, whole):
        assert json.loads((cache.out_dir / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
        assert manifest["image_ids"] == reference["image_ids"]
        for name in ("settings", "noising", "layers", "token_grid", "class_names", "inputs"):
            assert manifest[name] == reference[name], name
        # Batch size is operational: recorded per shard, absent from the key; the maps agree to float16 rounding.
        assert [(s["shard"], s["images"], s["batch_size"]) for s in manifest["shards"]] == [([1, 2], 2, 1), ([2, 2], 2, 1)]
        for image_id in reference["image_ids"]:
            a = read_cached_image(tmp_path / "whole" / cache.out_dir.name, image_id)
            b = read_cached_image(cache.out_dir, image_id)
            assert a.key == b.key
            np.testing.assert_allclose(a.i2t.astype(np.float32), b.i2t.astype(np.float32), rtol=2e-3, atol=1e-5)

    lost = whole[0]["image_ids"][3]
    cache_path(out[1].out_dir, lost).unlink()  # shard 2 was killed before writing this image's t = 4 maps
    # The message names the command that re-runs the shard job (here by its rule: no shard records in this layout).
    rebuild = re.escape(f"`snakemake {out[1].out_dir / 'manifest.json'} --forcerun extract_attention_shard`")
    with pytest.raises(ValueError, match=f"1 cache files are missing.*t4/{lost}.*{rebuild}"):
        gather_shards(shards, world / "data")
    with pytest.raises(ValueError, match=r"not 1\.\.n of one n"):
        gather_shards(shards[:1], world / "data")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = extract_shard(out, world / "data", (2, 2), batch_size=1)
    assert "t8 shard 2 of 2: 0 of 2 images to extract" in caplog.text
    assert "t4 shard 2 of 2: 1 of 2 images to extract" in caplog.text
    assert again["run"]["images_computed"] == 1
    assert gather_shards([shards[0], again], world / "data")[1]["image_ids"] == whole[1]["image_ids"]


def test_one_run_over_several_timesteps_caches_the_maps_of_one_run_per_timestep(world, tmp_path, monkeypatch):
    """The VAE and text encoders run once per image for all timesteps: the maps equal the per-timestep path."""
    from seg4diff_repro.attention.extract import TimestepCache, extract_attention_timesteps

    encoded = {"images": 0, "prompts": 0}
    encode_images, encode_prompts = SD3Adapter.encode_images, SD3Adapter.encode_prompts

    def count_images(self, images):
        encoded["images"] += len(images)
        return encode_images(self, images)

    def count_prompts(self, prompts):
        encoded["prompts"] += len(prompts)
        return encode_prompts(self, prompts)

    monkeypatch.setattr(SD3Adapter, "encode_images", count_images)
    monkeypatch.setattr(SD3Adapter, "encode_prompts", count_prompts)
    sweep = {1: [1], 8: [1, 3], 20: [3]}  # the analysis timestep with more layers, as the appendix sweep records
    caches = [TimestepCache(settings_for(world, timestep=k, layers=layers), tmp_path / "sweep" / f"t{k}")
              for k, layers in sweep.items()]
    manifests = extract_attention_timesteps(caches, world / "data", batch_size=3)
    assert encoded == {"images": 4, "prompts": 4}  # 4 images, 3 timesteps: each encoded once
    for (k, layers), manifest in zip(sweep.items(), manifests):
        single = extract_attention(settings_for(world, timestep=k, layers=layers), world / "data",
                                   tmp_path / f"single_t{k}", batch_size=3)
        assert manifest["noising"] == single["noising"] and manifest["noising"]["k"] == k
        assert manifest["settings"] == single["settings"]
        for image_id in single["image_ids"]:
            reused = read_cached_image(tmp_path / "sweep" / f"t{k}", image_id)
            alone = read_cached_image(tmp_path / f"single_t{k}", image_id)
            assert reused.key == alone.key  # the single run would accept (and skip) the reused cache
            np.testing.assert_array_equal(reused.layers, layers)
            np.testing.assert_array_equal(reused.i2t, alone.i2t)
            np.testing.assert_array_equal(reused.logits, alone.logits)
            assert (reused.prompt, reused.seed, reused.box) == (alone.prompt, alone.seed, alone.box)
    # Timesteps differ: the same image's maps at t = 1 and t = 20 (layer 1 vs 3 aside) are not the same noise level.
    assert manifests[0]["noising"]["sigma"] != manifests[2]["noising"]["sigma"]


def test_caches_of_one_run_must_share_everything_but_timestep_and_layers(world, tmp_path):
    from seg4diff_repro.attention.extract import TimestepCache, extract_attention_timesteps

    caches = [TimestepCache(settings_for(world, timestep=8), tmp_path / "a"),
              TimestepCache(settings_for(world, timestep=4, seed=3), tmp_path / "b")]
    with pytest.raises(ValueError, match=r"differs from .* in \['seed'\]"):
        extract_attention_timesteps(caches, world / "data")
