"""The on-disk attention cache: one small .npz per image, written atomically.

Each file holds the head-mean post-softmax I2T maps of the recorded layers (float16, image tokens ×
the text positions the prompt's classes occupy), the prompt with each class's token span, the noise
seed, and the key of the settings that produced it, so that a changed setting never reuses a stale
file and an interrupted run resumes where it stopped. Keeping only the class tokens' columns makes a
24-layer SD3 entry a few hundred kB instead of 15 MB for all 77 columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg4diff_repro.atomic import atomic_write_bytes


# Bumped whenever the cached content changes (2: pre-softmax logits added; 3: untruncated class spans, the
# window's last column kept for the official overflow rule, oracle classes from the resized label), so that the
# workflow re-extracts.
CACHE_FORMAT = 3


@dataclass
class CachedImage:
    image_id: str
    key: str
    layers: np.ndarray  # [L] joint-layer indices
    i2t: np.ndarray  # [L, n_image_tokens, len(columns)] float16
    token_grid: tuple[int, int]
    prompt: str
    class_ids: np.ndarray  # [C] class ids in prompt order
    spans: np.ndarray  # [C, 2] half-open text positions per class, untruncated (may pass the window)
    seed: int
    box: tuple[int, int, int, int]  # region of the original image the input showed (top, left, bottom, right)
    columns: np.ndarray | None = None  # text positions of the i2t columns; None: 0..n-1
    logits: np.ndarray | None = None  # pre-softmax scaled scores of the same slice (appendix Table 1)

    def local_spans(self, spans: np.ndarray | list | None = None) -> np.ndarray:
        """``spans`` (default: the class spans) as indices into the stored columns.

        Spans are runs of consecutive positions that must lie inside the window (`prompts.window_spans`).
        """
        columns = np.arange(self.i2t.shape[-1]) if self.columns is None else self.columns
        spans = self.spans if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        return np.searchsorted(columns, spans)


def cache_path(folder: Path, image_id: str) -> Path:
    return Path(folder) / f"{image_id}.npz"


def write_cached_image(folder: Path, entry: CachedImage) -> Path:
    """Write atomically: a reader never sees a half-written file, even if the run is killed."""
    path = cache_path(folder, entry.image_id)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        key=np.array(entry.key),
        layers=entry.layers.astype(np.int16),
        i2t=entry.i2t.astype(np.float16),
        token_grid=np.array(entry.token_grid, dtype=np.int32),
        prompt=np.array(entry.prompt),
        class_ids=entry.class_ids.astype(np.int32),
        spans=entry.spans.astype(np.int32).reshape(-1, 2),
        seed=np.array(entry.seed, dtype=np.int64),
        box=np.array(entry.box, dtype=np.int64),
        **({} if entry.logits is None else {"logits": entry.logits.astype(np.float16)}),
        columns=np.arange(entry.i2t.shape[-1]) if entry.columns is None else entry.columns.astype(np.int32),
    )
    # Keeps the umask's file mode and removes its temp file if anything fails before the rename.
    atomic_write_bytes(path, buffer.getvalue())
    return path


def shard_records(folder: Path, image_ids: Collection[str] = ()) -> list[Path]:
    """The shard records (workflow/rules/attention.smk) of the extraction jobs that write cache ``folder``:
    ``<folder>/shards/*.json``, or for a timestep-sweep cache ``sweep/t{k}`` the sweep's ``sweep/shards/*.json``.
    With ``image_ids``, only those whose shard holds one of these images (all of them if none lists one)."""
    folder = Path(folder)
    records = sorted((folder.parent if folder.parent.name == "sweep" else folder).joinpath("shards").glob("*.json"))
    if not image_ids:
        return records

    def holds_image(record: Path) -> bool:
        try:
            caches = json.loads(record.read_text())["caches"]
            return any(not set(image_ids).isdisjoint(cache["image_ids"]) for cache in caches)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    return [record for record in records if holds_image(record)] or records


def rebuild_command(folder: Path, image_ids: Collection[str] = ()) -> str:
    """The command that re-runs the extraction shard job(s) writing ``folder`` (or its images ``image_ids``), which
    recompute only missing or unreadable files, and then the gather job that checks the cache and writes its manifest.

    The manifest is the gather job's output, so forcing it alone would re-check the damaged file, not recompute it:
    the forced jobs are the shard jobs, named by their records; without records, by their rule.
    """
    folder = Path(folder)
    records = shard_records(folder, image_ids)
    if folder.parent.name == "sweep":
        rule = "extract_attention_sweep_shard"
    elif "attention_null" in folder.parts:
        rule = "extract_unsupervised_attention_shard"
    else:
        rule = "extract_attention_shard"
    forced = [str(record) for record in records] or [rule]
    return f"snakemake {folder / 'manifest.json'} --forcerun {' '.join(forced)}"


# What follows a rebuild command in the messages: the command names the default config's run.
RERUN_NOTE = ("add the --configfile and --config of your run, if it had any; then run your command again, which "
              "re-runs what depends on the cache")


class DamagedCacheError(OSError):
    """A cache file exists but cannot be read (truncated, not an .npz, a field missing)."""


def read_cached_image(folder: Path, image_id: str) -> CachedImage:
    path = cache_path(folder, image_id)
    try:
        with np.load(path) as data:
            return CachedImage(
                image_id=image_id,
                key=str(data["key"]),
                layers=data["layers"].astype(np.int64),
                i2t=data["i2t"],
                token_grid=tuple(int(v) for v in data["token_grid"]),
                prompt=str(data["prompt"]),
                class_ids=data["class_ids"].astype(np.int64),
                spans=data["spans"].astype(np.int64),
                seed=int(data["seed"]),
                box=tuple(int(v) for v in data["box"]),
                columns=data["columns"].astype(np.int64),
                logits=data["logits"] if "logits" in data.files else None,
            )
    except FileNotFoundError:
        raise FileNotFoundError(
            f"attention cache file {path} is missing: `{rebuild_command(folder, [image_id])}` re-runs the extraction "
            f"job that writes it (it recomputes only missing or unreadable files); {RERUN_NOTE}"
        ) from None
    except Exception as error:  # zipfile.BadZipFile, EOFError, zlib.error, KeyError, ValueError: all mean damaged
        raise DamagedCacheError(
            f"attention cache file {path} is damaged ({type(error).__name__}: {error}): "
            f"`{rebuild_command(folder, [image_id])}` re-runs the extraction job that writes it (it recomputes only "
            f"missing or unreadable files); {RERUN_NOTE}"
        ) from error


def cached_key(folder: Path, image_id: str) -> str | None:
    """The settings key stored in an image's cache file, or None if it is absent or unreadable.

    Any failure to open the file counts as unreadable (an empty or truncated file raises EOFError or
    zipfile.BadZipFile, not OSError), so that extraction recomputes it instead of crashing.
    """
    try:
        with np.load(cache_path(folder, image_id)) as data:
            return str(data["key"])
    except Exception:
        return None


def settings_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def load_manifest(path: Path) -> dict:
    """An extraction manifest; one written in another cache format is refused (its keys and spans differ)."""
    manifest = json.loads(Path(path).read_text())
    found = manifest.get("settings", {}).get("cache_format")
    if found != CACHE_FORMAT:
        raise ValueError(
            f"{path} was written in attention-cache format {found}, but this version reads format {CACHE_FORMAT}: "
            "re-run its extraction rule"
        )
    return manifest
