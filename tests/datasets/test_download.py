"""Real download code against a local server: streaming, Range resume, retries, checksums, no re-fetch."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from ds_support import sha256

from seg4diff_repro.datasets import sources
from seg4diff_repro.datasets.download import (
    ChecksumMismatchError,
    DownloadError,
    download,
    verify_file,
)

DATA = os.urandom(300_000)
FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}


def test_download_streams_verifies_and_is_not_fetched_again(server, tmp_path):
    url = server.add("a.tar", DATA)
    dest = tmp_path / "dl" / "a.tar"
    assert download(url, dest, sha256(DATA), **FAST) == sha256(DATA)
    assert dest.read_bytes() == DATA
    assert not dest.with_name("a.tar.part").exists()
    record = json.loads(dest.with_name("a.tar.verified").read_text())
    assert record["digest"] == sha256(DATA)[1] and record["size"] == len(DATA)
    assert server.gets("a.tar") == [(None, 200)]
    # What verified is never fetched again (nor re-hashed: the record matches size and mtime).
    download(url, dest, sha256(DATA), **FAST)
    assert len(server.gets("a.tar")) == 1


def test_transfer_cut_halfway_is_resumed_with_range(server, tmp_path):
    url = server.add("big.zip", DATA)
    server.state.cut_once.add("/big.zip")
    sleeps = []
    dest = tmp_path / "big.zip"
    download(url, dest, ("md5", hashlib.md5(DATA).hexdigest()), sleep=sleeps.append, **FAST)
    assert dest.read_bytes() == DATA
    gets = server.gets("big.zip")
    assert gets[0] == (None, 200)
    assert gets[1] == (f"bytes={len(DATA) // 2}-", 206)  # resumed exactly where the cut happened
    assert len(gets) == 2


def test_interrupted_run_resumes_from_the_part_file(server, tmp_path):
    url = server.add("x.json", DATA)
    dest = tmp_path / "x.json"
    dest.with_name("x.json.part").write_bytes(DATA[:1000])  # left by a killed earlier run
    download(url, dest, ("sha1", hashlib.sha1(DATA).hexdigest()), **FAST)
    assert dest.read_bytes() == DATA
    assert server.gets("x.json") == [("bytes=1000-", 206)]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    url = server.add("y.bin", DATA)
    server.state.ignore_range.add("/y.bin")
    dest = tmp_path / "y.bin"
    dest.with_name("y.bin.part").write_bytes(b"garbage" * 10)
    download(url, dest, sha256(DATA), **FAST)
    assert dest.read_bytes() == DATA


def test_complete_part_file_is_finished_by_a_416(server, tmp_path):
    url = server.add("z.bin", DATA)
    dest = tmp_path / "z.bin"
    dest.with_name("z.bin.part").write_bytes(DATA)
    download(url, dest, sha256(DATA), **FAST)
    assert dest.read_bytes() == DATA
    assert server.gets("z.bin") == [(f"bytes={len(DATA)}-", 416)]


def test_transient_errors_are_retried_with_exponential_backoff(server, tmp_path):
    url = server.add("r.bin", DATA)
    server.state.fail["/r.bin"] = [503, 503, 429]
    sleeps = []
    download(url, tmp_path / "r.bin", sha256(DATA), backoff=0.5, sleep=sleeps.append, timeout=5, progress=False)
    assert sleeps == [0.5, 1.0, 2.0]
    assert (tmp_path / "r.bin").read_bytes() == DATA


def test_gives_up_after_the_retries_and_names_the_url(server, tmp_path):
    url = server.add("g.bin", DATA)
    server.state.fail["/g.bin"] = [503] * 10
    with pytest.raises(DownloadError, match=r"g\.bin.*HTTP 503.*gave up after 2 retries"):
        download(url, tmp_path / "g.bin", sha256(DATA), retries=2, sleep=lambda s: None, timeout=5, progress=False)
    assert not (tmp_path / "g.bin").exists()


def test_falls_back_to_the_next_mirror_on_404(server, tmp_path):
    good = server.add("m.bin", DATA)
    download([server.url("missing/m.bin"), good], tmp_path / "m.bin", sha256(DATA), **FAST)
    assert (tmp_path / "m.bin").read_bytes() == DATA


def test_checksum_mismatch_removes_the_file_and_names_url_and_both_checksums(server, tmp_path):
    url = server.add("bad.tar", DATA)
    wrong = ("md5", "0" * 32)
    dest = tmp_path / "bad.tar"
    with pytest.raises(ChecksumMismatchError) as err:
        download(url, dest, wrong, **FAST)
    msg = str(err.value)
    assert url in msg and "0" * 32 in msg and hashlib.md5(DATA).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # no file, no .part, no .verified: nothing looks done


def test_a_corrupted_existing_file_is_replaced(server, tmp_path):
    url = server.add("c.tar", DATA)
    dest = tmp_path / "c.tar"
    download(url, dest, sha256(DATA), **FAST)
    dest.write_bytes(b"bit rot")  # size/mtime change invalidates the .verified record
    download(url, dest, sha256(DATA), **FAST)
    assert dest.read_bytes() == DATA and len(server.gets("c.tar")) == 2


def test_unpublished_checksum_is_recorded_on_first_use(server, tmp_path):
    url = server.add("s.zip", DATA)
    dest = tmp_path / "s.zip"
    algo, digest = download(url, dest, None, **FAST)
    assert (algo, digest) == sha256(DATA)
    record = json.loads(dest.with_name("s.zip.verified").read_text())
    assert record["trusted_on_first_use"] is True
    assert verify_file(dest, None) == sha256(DATA)


def test_published_checksums_are_well_formed():
    for archive in sources.ARCHIVES.values():
        assert archive.urls and archive.filename and archive.size_gb > 0
        if archive.checksum is not None:
            assert sources.parse_checksum(":".join(archive.checksum)) == archive.checksum
    assert sources.ARCHIVES["voc2012_trainval"].checksum == ("md5", "6cd6e144f989b92b3379bac3b3de84fd")
    counts = {n: d.expected_count for n, d in sources.DATASETS.items()}
    assert counts == {"voc21": 1449, "coco_object": 5000, "pc59": 5105, "ade150": 2000, "coco_stuff27": 5000,
                      "cityscapes": 500, "coco_stuff171_train": 10001, "sa1b_sa_000020": None}
