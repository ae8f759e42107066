"""Resumable accumulation over a dataset in shards of images.

Scoring a large dataset (or streaming per-head maps on a GPU) accumulates additive metric states:
confusion matrices, Hungarian TP/FP/FN counts. Each shard of images gets its own folder holding
every accumulator's state (written with its ``save``) and the key of the settings and image ids
that produced it, swapped in atomically when the shard is complete. A killed run therefore leaves
only complete shards behind; the next run loads those whose key matches and computes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from seg4diff_repro.progress import progress

from seg4diff_repro.atomic import atomic_write_json, replace_folder_atomically

log = logging.getLogger(__name__)

KEY_FILE = "shard.json"


class Accumulator(Protocol):
    def merge(self, other) -> None: ...

    def save(self, path: str | Path) -> None: ...

    @classmethod
    def load(cls, path: str | Path): ...


A = TypeVar("A", bound=Accumulator)


def shard_key(settings_key: str, ids: Sequence[str]) -> str:
    """Key of one shard: the settings and the exact images it covers."""
    return hashlib.sha256(json.dumps([settings_key, list(ids)]).encode()).hexdigest()[:20]


def _shard_is_current(folder: Path, key: str, names: Sequence[str]) -> bool:
    try:
        stored = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored.get("key") == key and all((folder / f"{name}.npz").is_file() for name in names)


def accumulate_in_shards(
    ids: Sequence[str],
    shard_root: Path,
    settings_key: str,
    shard_size: int,
    new_accumulators: Callable[[], Mapping[str, A]],
    process: Callable[[Mapping[str, A], range], None],
    desc: str,
) -> dict[str, A]:
    """Accumulate over ``ids`` shard by shard; return the merged accumulators.

    ``new_accumulators()`` gives fresh, empty accumulators keyed by name (the same names every call);
    ``process(accumulators, positions)`` adds the images at ``positions`` (indices into ``ids``).
    Shards under ``shard_root`` whose key matches are loaded instead of recomputed; stale shards
    (other settings, other images, or beyond the end of a shrunken dataset) are removed.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shard_root = Path(shard_root)
    shard_root.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(ids), shard_size)
    names = list(new_accumulators())
    plan = []
    for number, start in enumerate(starts):
        positions = range(start, min(start + shard_size, len(ids)))
        key = shard_key(settings_key, [ids[i] for i in positions])
        folder = shard_root / f"shard_{number:05d}"
        plan.append((folder, key, positions, _shard_is_current(folder, key, names)))
    expected = {folder.name for folder, *_ in plan}
    for leftover in shard_root.iterdir():
        if leftover.name not in expected:  # stale shards and staging folders of killed runs
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    todo = [entry for entry in plan if not entry[3]]
    log.info("%s: %d of %d shards to compute (%d kept from an earlier run)",
             shard_root, len(todo), len(plan), len(plan) - len(todo))
    for folder, key, positions, _ in progress(todo, desc=desc, unit="shard"):
        accumulators = new_accumulators()
        process(accumulators, positions)
        with replace_folder_atomically(folder, staging=shard_root / f".{folder.name}.staging") as staging:
            for name, accumulator in accumulators.items():
                accumulator.save(staging / f"{name}.npz")
            atomic_write_json(staging / KEY_FILE, {"key": key, "ids": [ids[i] for i in positions]})

    merged = dict(new_accumulators())
    for folder, *_ in plan:
        for name, accumulator in merged.items():
            accumulator.merge(type(accumulator).load(folder / f"{name}.npz"))
    return merged
