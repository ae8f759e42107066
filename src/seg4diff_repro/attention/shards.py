"""Extraction settings and the gathering of extraction shards, without torch.

The gather jobs (one per cache) only read the shards' records and the cache files' keys: importing torch and the
model code, as `seg4diff_repro.attention.extract` does, would cost them seconds each.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from seg4diff_repro.attention.cache import CACHE_FORMAT, RERUN_NOTE, cache_path, cached_key, rebuild_command, settings_key
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.layout import atomic_write_json

__all__ = ["ExtractionSettings", "gather_shards", "parse_shard", "shard_positions"]

# What a cache's manifest takes from its shards' records (they agree on all of it; `gather_shards` checks).
_SHARED_MANIFEST_FIELDS = ("settings", "noising", "layers", "token_grid", "text_tokens", "class_names",
                           "ignore_index", "model", "lora", "inputs", "provenance", "seed_rule")


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines the cached maps (a change invalidates the cache)."""

    model: str
    dataset: str
    backbone: str
    source: str
    dtype: str
    timestep: int
    num_steps: int
    layers: tuple[int, ...] | None
    seed: int
    short_side: int | None
    resize: str
    prompt: str
    background_name: str
    split: str
    background: str  # the dataset view: class, last, ignore or drop (datasets.layout.BACKGROUND_MODES)
    limit: int | None
    model_options: tuple[tuple[str, object], ...] = ()
    cache_format: int = CACHE_FORMAT
    pad_multiple: int | None = None  # zero-pad to a multiple before the stretch (the unsupervised model's input)
    prompt_classes_from: str = "resized"  # the oracle class set: from the short-side resized label (official)
    revision: str | None = None  # the hub commit of `source` (None: a local folder, or the newest)
    lora: str | None = None  # folder of the MAGNET adapter applied after loading (a `lora` variant), or None

    @classmethod
    def from_dict(cls, spec: dict) -> ExtractionSettings:
        layers = spec.get("layers")
        return cls(**{
            **spec,
            "layers": None if layers in (None, "all") else tuple(layers),
            "model_options": tuple(sorted(dict(spec.get("model_options", {})).items())),
        })


def parse_shard(shard: str) -> tuple[int, int]:
    """``"2-of-8"`` (Snakemake's scatter item) → (2, 8); shards are numbered from 1."""
    match = re.fullmatch(r"([0-9]+)-of-([0-9]+)", shard)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"shard {shard!r}: use '<i>-of-<n>' with 1 <= i <= n, e.g. 1-of-1 or 3-of-8")
    return int(match.group(1)), int(match.group(2))


def shard_positions(n_images: int, shard: tuple[int, int]) -> range:
    """The images of shard i of n: the i-th of n contiguous, near-equal runs of the dataset's order."""
    index, count = shard
    return range((index - 1) * n_images // count, index * n_images // count)


def gather_shards(shards: list[dict], dataset_root: Path) -> list[dict]:
    """Check that ``shards`` (records of `extract_shard`) cover the dataset once, with one key per cache, and
    that every image's cache file carries that key; write and return each cache's manifest.

    A manifest is what an unsharded run writes, plus each shard's images and operational record.
    """
    if not shards:
        raise ValueError("no shards to gather")
    counts = {shard["shard"][1] for shard in shards}
    numbers = sorted(shard["shard"][0] for shard in shards)
    folders = [record["out_dir"] for record in shards[0]["caches"]]
    if len(counts) != 1 or numbers != list(range(1, counts.pop() + 1)):
        raise ValueError(f"{folders}: shards {[s['shard'] for s in shards]} are not 1..n of one n; re-run the "
                         "extraction rule so that every shard of the same scatter count is present")
    ordered = sorted(shards, key=lambda shard: shard["shard"][0])
    manifests = []
    for position, folder in enumerate(folders):
        records = [shard["caches"][position] for shard in ordered]
        first = records[0]
        stale = [shard["shard"] for shard, record in zip(ordered, records)
                 if record["out_dir"] != folder or record["key"] != first["key"]]
        if stale:
            raise ValueError(f"{folder}: shards {stale} were extracted with other settings, code, model or data "
                             f"than shard {ordered[0]['shard']}: `{rebuild_command(Path(folder))}` re-runs the "
                             f"extraction (they recompute); {RERUN_NOTE}")
        settings = ExtractionSettings.from_dict(first["settings"])
        dataset = SegmentationDataset(dataset_root, settings.split, background=settings.background,
                                      limit=settings.limit)
        image_ids = [image_id for record in records for image_id in record["image_ids"]]
        if image_ids != dataset.ids:
            raise ValueError(f"{folder}: the shards hold {len(image_ids)} images, {dataset_root} split "
                             f"{settings.split!r} has {len(dataset.ids)} (or another order): "
                             f"`{rebuild_command(Path(folder))}` re-runs the extraction; {RERUN_NOTE}")
        key = settings_key({**asdict(settings), **first["inputs"]})
        missing = [image_id for image_id in image_ids if cached_key(Path(folder), image_id) != key]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} cache files are missing or hold other settings (first: "
                             f"{cache_path(Path(folder), missing[0])}): `{rebuild_command(Path(folder), missing)}` "
                             f"re-runs the extraction shards that write them, which recompute only those; {RERUN_NOTE}")
        manifest = {name: first[name] for name in _SHARED_MANIFEST_FIELDS} | {
            "image_ids": image_ids,
            "shards": [{"shard": shard["shard"], "images": len(record["image_ids"]), **shard["run"]}
                       for shard, record in zip(ordered, records)],
        }
        atomic_write_json(Path(folder) / "manifest.json", manifest)
        manifests.append(manifest)
    return manifests
