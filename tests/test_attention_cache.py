"""The per-image attention cache: round trip, atomic replacement, and how damaged or missing files behave.

extract.py skips an image when ``cached_key(out_dir, id) == key`` and rewrites it otherwise, so a
damaged file must read as ``None`` (recomputed), never crash; score.py reads with ``read_cached_image``.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from seg4diff_repro.attention.cache import (
    CachedImage,
    DamagedCacheError,
    cache_path,
    cached_key,
    read_cached_image,
    rebuild_command,
    settings_key,
    write_cached_image,
)


def make_entry(image_id="2007_000033", key=None, n_layers=3, n_image=256, classes=3, seed=2**62 + 12345):
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    i2t = rng.random((n_layers, n_image, 77)) * 1e-3  # post-softmax magnitudes
    spans = np.array([[1, 2], [2, 5], [5, 6], [6, 6]][:classes]).reshape(-1, 2)
    return CachedImage(
        image_id=image_id,
        key=key if key is not None else settings_key({"model": "sd3", "timestep": 8, "layers": [9], "é": "ü"}),
        layers=np.array([0, 9, 23][:n_layers]),
        i2t=i2t,
        token_grid=(16, 16),
        prompt="aeroplane diningtable person"[: 100 if classes else 0],
        class_ids=np.array([1, 11, 15, 16][:classes]),
        spans=spans,
        seed=seed,
        box=(0, 3, 480, 353),
    )


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_round_trip_values_and_dtypes(tmp_path):
    entry = make_entry()
    path = write_cached_image(tmp_path, entry)
    assert path == cache_path(tmp_path, entry.image_id) == tmp_path / f"{entry.image_id}.npz"
    back = read_cached_image(tmp_path, entry.image_id)
    assert back.image_id == entry.image_id and back.key == entry.key and back.prompt == entry.prompt
    assert back.i2t.dtype == np.float16 and back.i2t.shape == (3, 256, 77)
    np.testing.assert_array_equal(back.i2t, entry.i2t.astype(np.float16))  # exactly the float16 rounding
    np.testing.assert_allclose(back.i2t.astype(np.float64), entry.i2t, rtol=2.0**-11, atol=2.0**-25)
    for name in ("layers", "class_ids", "spans"):
        value = getattr(back, name)
        assert np.issubdtype(value.dtype, np.integer), name
        np.testing.assert_array_equal(value, getattr(entry, name))
    assert back.spans.shape == (3, 2)
    assert back.seed == entry.seed and isinstance(back.seed, int)  # 63-bit seeds survive
    assert back.token_grid == (16, 16) and all(type(v) is int for v in back.token_grid)
    assert back.box == (0, 3, 480, 353) and all(type(v) is int for v in back.box)
    assert cached_key(tmp_path, entry.image_id) == entry.key


def test_empty_prompt_keeps_span_shape(tmp_path):
    entry = make_entry(classes=0)
    entry.spans = np.array([])
    entry.class_ids = np.array([], dtype=np.int64)
    write_cached_image(tmp_path, entry)
    back = read_cached_image(tmp_path, entry.image_id)
    assert back.spans.shape == (0, 2) and back.class_ids.shape == (0,) and back.prompt == ""


def test_nested_image_id(tmp_path):
    entry = make_entry("frankfurt/frankfurt_000000_000294")
    write_cached_image(tmp_path, entry)
    assert (tmp_path / "frankfurt" / "frankfurt_000000_000294.npz").is_file()
    assert read_cached_image(tmp_path, entry.image_id).key == entry.key


def test_no_temp_files_and_regular_permissions(tmp_path):
    for image_id in ("a", "b", "a"):
        write_cached_image(tmp_path, make_entry(image_id))
    assert listing(tmp_path) == ["a.npz", "b.npz"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_existing_file_replaced_whole(tmp_path):
    big = make_entry("x", key="old", n_layers=3, n_image=1024)
    small = make_entry("x", key="new", n_layers=1, n_image=64, classes=1)
    path = write_cached_image(tmp_path, big)
    with open(path, "rb") as old_handle:  # a reader that opened the file before the rewrite
        write_cached_image(tmp_path, small)
        with np.load(old_handle) as old:  # still sees the complete old file, not a mix
            assert str(old["key"]) == "old" and old["i2t"].shape == (3, 1024, 77)
    back = read_cached_image(tmp_path, "x")
    assert back.key == "new" and back.i2t.shape == (1, 64, 77) and back.spans.shape == (1, 2)
    np.testing.assert_array_equal(back.i2t, small.i2t.astype(np.float16))
    with zipfile.ZipFile(path) as archive:  # one valid archive, nothing left of the bigger one
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(
            f"{n}.npy" for n in ("key", "layers", "i2t", "token_grid", "prompt", "class_ids", "spans", "seed", "box", "columns")
        )
    assert listing(tmp_path) == ["x.npz"]


def test_failed_write_leaves_no_temp_file(tmp_path):
    (tmp_path / "y.npz").mkdir()  # the final rename cannot replace a non-empty folder
    (tmp_path / "y.npz" / "keep").write_text("")
    with pytest.raises(OSError):
        write_cached_image(tmp_path, make_entry("y"))
    assert listing(tmp_path) == ["y.npz", "y.npz/keep"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "header_only", "garbage", "no_key"])
def test_damaged_file_reads_as_not_cached(tmp_path, damage):
    path = write_cached_image(tmp_path, make_entry("z"))
    raw = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "header_only":
        path.write_bytes(raw[:30])
    elif damage == "garbage":
        path.write_bytes(os.urandom(500))
    else:
        np.savez(path, i2t=np.zeros(3))
    assert cached_key(tmp_path, "z") is None
    # ... so the extraction's skip test (cached_key == key) recomputes it, and rewriting repairs it.
    entry = make_entry("z")
    write_cached_image(tmp_path, entry)
    assert cached_key(tmp_path, "z") == entry.key


def write_shard_records(records: Path, shards: list[list[str]], n_caches: int = 1) -> list[Path]:
    """Shard records as `extract_shard` writes them (workflow/rules/attention.smk): shard i of n holds its images."""
    records.mkdir(parents=True)
    paths = []
    for index, image_ids in enumerate(shards, start=1):
        path = records / f"{index}-of-{len(shards)}.json"
        path.write_text(json.dumps({"shard": [index, len(shards)],
                                    "caches": [{"image_ids": image_ids} for _ in range(n_caches)]}))
        paths.append(path)
    return paths


def test_missing_file(tmp_path):
    assert cached_key(tmp_path, "nope") is None
    with pytest.raises(FileNotFoundError) as error:
        read_cached_image(tmp_path / "cache", "nope")
    message = str(error.value)
    assert str(tmp_path / "cache" / "nope.npz") in message
    # No shard records to name: the shard rule, forced within the cache's own DAG.
    assert f"`snakemake {tmp_path / 'cache' / 'manifest.json'} --forcerun extract_attention_shard`" in message


def test_the_rebuild_forces_the_shard_job_that_writes_the_image_not_the_gather(tmp_path):
    # The manifest is the gather job's output: forcing it only re-checks the damaged file (tests/test_faults.py
    # runs the command). The shard jobs' outputs are their records, which list their images.
    cache = tmp_path / "results/attention/m/d/t8"
    first, second = write_shard_records(cache / "shards", [["a", "b"], ["c", "d"]])
    assert rebuild_command(cache, ["c"]) == f"snakemake {cache / 'manifest.json'} --forcerun {second}"
    assert rebuild_command(cache, ["a", "d"]) == f"snakemake {cache / 'manifest.json'} --forcerun {first} {second}"
    assert rebuild_command(cache) == f"snakemake {cache / 'manifest.json'} --forcerun {first} {second}"
    # A sweep's caches sweep/t{k} share the sweep job's records, sweep/shards/.
    sweep = tmp_path / "results/attention/m/d/sweep"
    (record,) = write_shard_records(sweep / "shards", [["a", "b"]], n_caches=2)
    assert rebuild_command(sweep / "t4", ["b"]) == f"snakemake {sweep / 't4/manifest.json'} --forcerun {record}"
    assert rebuild_command(tmp_path / "results/attention/m/e/sweep/t4") == (
        f"snakemake {tmp_path / 'results/attention/m/e/sweep/t4/manifest.json'} --forcerun extract_attention_sweep_shard")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_key"])
def test_damaged_file_read_names_the_file_and_the_rebuild(tmp_path, damage):
    # numpy alone raises "zipfile.BadZipFile: File is not a zip file", naming no file.
    path = write_cached_image(tmp_path, make_entry("z"))
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(500))
    else:
        np.savez(path, i2t=np.zeros(3))
    with pytest.raises(DamagedCacheError) as error:
        read_cached_image(tmp_path, "z")
    message = str(error.value)
    assert str(path) in message and f"`snakemake {tmp_path / 'manifest.json'} --forcerun extract_attention_shard`" in message


def test_settings_key_order_independent():
    a = settings_key({"model": "sd3", "layers": [9], "seed": 0})
    b = settings_key({"seed": 0, "layers": [9], "model": "sd3"})
    assert a == b and a != settings_key({"seed": 1, "layers": [9], "model": "sd3"})


def test_pre_softmax_logits_round_trip(tmp_path):
    entry = make_entry()
    entry.logits = (np.arange(entry.i2t.size, dtype=np.float32).reshape(entry.i2t.shape) / 7 - 20).astype(np.float16)
    write_cached_image(tmp_path, entry)
    loaded = read_cached_image(tmp_path, entry.image_id)
    np.testing.assert_array_equal(loaded.logits, entry.logits)
    write_cached_image(tmp_path, make_entry())
    assert read_cached_image(tmp_path, entry.image_id).logits is None
