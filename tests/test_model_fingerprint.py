"""Model fingerprints: content hashes of a local folder, remembered by (path, size, mtime) between jobs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from seg4diff_repro.models.common import model_fingerprint


def reference_fingerprint(folder: Path) -> str:
    """The definition, recomputed directly: sha256 over each file's relative name and its sha256."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def test_fingerprint_hashes_contents_and_remembers_unchanged_files(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    weights = model / "transformer/weights.bin"
    weights.write_bytes(os.urandom(3 << 20))
    first = model_fingerprint(model)
    assert first == reference_fingerprint(model)
    memo = tmp_path / "cache/seg4diff/file_sha256.json"
    known = json.loads(memo.read_text())
    assert len(known) == 2 and all(key.startswith(str(model.resolve())) for key in known)

    # An unchanged file is not read again: a planted memo entry for its (path, size, mtime) is used as is.
    planted = {key: ("0" * 64 if "weights.bin" in key else value) for key, value in known.items()}
    memo.write_text(json.dumps(planted))
    assert model_fingerprint(model) != first

    # New bytes (new mtime) are hashed again, whatever the memo says.
    weights.write_bytes(os.urandom(3 << 20))
    assert model_fingerprint(model) == reference_fingerprint(model) != first
    memo.write_text("not json")  # a damaged memo only means hashing again
    assert model_fingerprint(model) == reference_fingerprint(model)
