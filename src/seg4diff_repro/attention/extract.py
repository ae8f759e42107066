"""Extraction stage: run the Seg4Diff forward pass over a dataset and cache the I2T maps per image."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seg4diff_repro.attention.cache import (
    CACHE_FORMAT, CachedImage, cache_path, cached_key, settings_key, write_cached_image,
)
from seg4diff_repro.attention.recorder import AttentionRecorder
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.layout import atomic_write_json, dataset_fingerprint
from seg4diff_repro.models.preprocess import crop_to_box, prepare_image
from seg4diff_repro.models import load_adapter
from seg4diff_repro.models.common import describe_model_source, model_fingerprint
from seg4diff_repro.provenance import code_fingerprint, provenance
from seg4diff_repro.segmentation.prompts import build_class_prompt, prompt_class_ids

log = logging.getLogger(__name__)

SEED_RULE = "per-image noise seed = sha256('<seed>:<image_id>')[:8] >> 1"


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
    drop_background: bool
    limit: int | None
    model_options: tuple[tuple[str, object], ...] = ()
    cache_format: int = CACHE_FORMAT
    pad_multiple: int | None = None  # zero-pad to a multiple before the stretch (the unsupervised model's input)

    @classmethod
    def from_dict(cls, spec: dict) -> ExtractionSettings:
        layers = spec.get("layers")
        return cls(**{
            **spec,
            "layers": None if layers in (None, "all") else tuple(layers),
            "model_options": tuple(sorted(dict(spec.get("model_options", {})).items())),
        })


def image_seed(base_seed: int, image_id: str) -> int:
    """Noise seed of one image: fixed by the base seed and the image id, whatever the batching."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def extraction_inputs(settings: ExtractionSettings, dataset_root: Path) -> dict:
    """What the cached maps were computed from besides the settings: the extraction code, the model's
    weights and the prepared dataset's files, each by content, so that a change to any of them recomputes."""
    return {
        "code_fingerprint": code_fingerprint("extraction"),
        "model_fingerprint": model_fingerprint(settings.source),
        "dataset_fingerprint": dataset_fingerprint(dataset_root),
    }


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


def extract_shard(
    settings: ExtractionSettings,
    dataset_root: Path,
    out_dir: Path,
    *,
    shard: tuple[int, int] = (1, 1),
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """Cache the head-mean I2T maps of one shard of the split's images in ``out_dir``; return its record.

    Images whose cache file already carries the current settings key are skipped, so an interrupted
    run resumes without recomputing them. Shards of one cache write disjoint files into the same
    folder and may run at once, on different GPUs or machines; `gather_shards` checks and joins them.
    Device and batch size change how the maps are computed, not what they are: they are recorded
    (``run``) but are not part of the key.
    """
    from seg4diff_repro.gpu_slots import run_record

    started = time.time()
    out_dir = Path(out_dir)
    dataset = SegmentationDataset(
        dataset_root, settings.split, drop_background=settings.drop_background, limit=settings.limit
    )
    positions = shard_positions(len(dataset), shard)
    adapter = load_adapter(
        settings.backbone, settings.source, settings.dtype, device, **dict(settings.model_options)
    )
    noising = adapter.noising(settings.timestep, settings.num_steps)
    layers = list(range(adapter.num_layers)) if settings.layers is None else list(settings.layers)
    inputs = extraction_inputs(settings, dataset_root)
    key = settings_key({**asdict(settings), **inputs})
    todo = [i for i in positions if cached_key(out_dir, dataset.ids[i]) != key]
    log.info(
        "%s shard %d of %d: %d of %d images to extract (t = %d of %d: index %d, sigma %.5f)",
        out_dir, *shard, len(todo), len(positions), noising.k, noising.num_steps, noising.index, noising.sigma,
    )
    for start in tqdm(range(0, len(todo), batch_size), desc="extract attention", unit="batch"):
        samples = [dataset[i] for i in todo[start : start + batch_size]]
        _extract_batch(adapter, samples, dataset.class_names, settings, noising, layers, key, out_dir)

    return {
        "shard": list(shard),
        "key": hashlib.sha256(key.encode()).hexdigest(),
        "settings": asdict(settings),
        "noising": asdict(noising),
        "layers": layers,
        "token_grid": list(adapter.token_grid),
        "image_ids": [dataset.ids[i] for i in positions],
        "class_names": dataset.class_names,
        "ignore_index": dataset.ignore_index,
        "model": describe_model_source(settings.source),
        "inputs": inputs,
        "provenance": provenance("extraction"),
        "seed_rule": SEED_RULE,
        "run": run_record(
            device, batch_size=batch_size, images_computed=len(todo), images_reused=len(positions) - len(todo),
            started_at=round(started, 3), wall_s=round(time.time() - started, 3),
        ),
    }


def gather_shards(shards: list[dict], dataset_root: Path, out_dir: Path) -> dict:
    """Check that ``shards`` (records of `extract_shard`) cover the dataset once, with one key, and that
    every image's cache file carries that key; write and return the cache's manifest.

    The manifest is what a single unsharded run writes, plus each shard's operational record.
    """
    out_dir = Path(out_dir)
    if not shards:
        raise ValueError(f"{out_dir}: no shards to gather")
    first = shards[0]
    counts = {shard["shard"][1] for shard in shards}
    numbers = sorted(shard["shard"][0] for shard in shards)
    if len(counts) != 1 or numbers != list(range(1, counts.pop() + 1)):
        raise ValueError(f"{out_dir}: shards {[s['shard'] for s in shards]} are not 1..n of one n; re-run the "
                         "extraction rule so that every shard of the same scatter count is present")
    stale = [shard["shard"] for shard in shards if shard["key"] != first["key"]]
    if stale:
        raise ValueError(f"{out_dir}: shards {stale} were extracted with other settings, code, model or data "
                         f"than shard {first['shard']}; re-run the extraction rule (they recompute)")
    settings = ExtractionSettings.from_dict(first["settings"])
    dataset = SegmentationDataset(
        dataset_root, settings.split, drop_background=settings.drop_background, limit=settings.limit
    )
    ordered = sorted(shards, key=lambda shard: shard["shard"][0])
    image_ids = [image_id for shard in ordered for image_id in shard["image_ids"]]
    if image_ids != dataset.ids:
        raise ValueError(f"{out_dir}: the shards hold {len(image_ids)} images, {dataset_root} split "
                         f"{settings.split!r} has {len(dataset.ids)} (or another order); re-run the extraction rule")
    key = settings_key({**asdict(settings), **first["inputs"]})
    missing = [image_id for image_id in image_ids if cached_key(out_dir, image_id) != key]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} cache files are missing or hold other settings (first: "
                         f"{cache_path(out_dir, missing[0])}); re-run the extraction rule, which recomputes them")
    manifest = {
        **{name: first[name] for name in ("settings", "noising", "layers", "token_grid")},
        "image_ids": image_ids,
        **{name: first[name] for name in ("class_names", "ignore_index", "model", "inputs", "provenance",
                                          "seed_rule")},
        "shards": [{"shard": shard["shard"], "images": len(shard["image_ids"]), **shard["run"]} for shard in ordered],
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def extract_attention(
    settings: ExtractionSettings,
    dataset_root: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """Cache the head-mean I2T maps of every image of the split in ``out_dir``; return the manifest.

    One shard over the whole split, gathered: what the workflow does with ``--set-scatter extraction=1``.
    """
    shard = extract_shard(settings, dataset_root, out_dir, device=device, batch_size=batch_size)
    return gather_shards([shard], dataset_root, out_dir)


@dataclass
class RecordedBatch:
    """One batch's forward pass: the prompts, input boxes and noise seeds, and the recorder holding the maps."""

    prompts: list
    boxes: list[tuple[int, int, int, int]]
    seeds: list[int]
    recorder: AttentionRecorder


def record_batch(
    adapter, samples, class_names, settings: ExtractionSettings, noising, layers, *, record, heads
) -> RecordedBatch:
    """Prepare ``samples`` as the official evaluation does, run one forward pass, and record ``record``.

    The maps keep the prompt window only (77 CLIP or T5 positions), as the official slice.
    """
    prepared = [
        prepare_image(s.image, adapter.image_size, settings.short_side, settings.resize, settings.pad_multiple)
        for s in samples
    ]
    prompts = [
        build_class_prompt(
            prompt_class_ids(crop_to_box(s.label, box), len(class_names), settings.prompt),
            class_names,
            adapter.tokenizer,
            settings.background_name,
            start=adapter.prompt_start,
        )
        for s, (_, box) in zip(samples, prepared)
    ]
    seeds = [image_seed(settings.seed, s.image_id) for s in samples]
    latents = adapter.encode_images(torch.stack([pixels for pixels, _ in prepared]))
    noisy = adapter.noise_latents(latents, noising, seeds)
    prompt_embeds, pooled = adapter.encode_prompts([p.text for p in prompts])
    with AttentionRecorder(
        adapter.transformer, layers=layers, record=record, heads=heads, text_tokens=adapter.prompt_tokens
    ) as recorder:
        adapter.forward(noisy, noising, prompt_embeds, pooled)
    return RecordedBatch(prompts, [box for _, box in prepared], seeds, recorder)


def _extract_batch(adapter, samples, class_names, settings, noising, layers, key, out_dir) -> None:
    batch = record_batch(
        adapter, samples, class_names, settings, noising, layers, record=("i2t", "logits"), heads="mean"
    )
    recorder = batch.recorder
    i2t = torch.stack([recorder.i2t[layer][:, 0] for layer in layers], dim=1).cpu().numpy()
    logits = torch.stack([recorder.logits_i2t[layer][:, 0] for layer in layers], dim=1).cpu().numpy()
    for b, (sample, prompt) in enumerate(zip(samples, batch.prompts)):
        if settings.prompt == "null":  # unsupervised segmentation reads every position of the window
            columns = np.arange(adapter.prompt_tokens)
        else:
            columns = np.unique(np.concatenate([np.arange(s, e) for s, e in prompt.spans] + [[]])).astype(int)
        write_cached_image(
            out_dir,
            CachedImage(
                image_id=sample.image_id,
                key=key,
                layers=np.array(layers),
                i2t=i2t[b][..., columns],
                token_grid=adapter.token_grid,
                prompt=prompt.text,
                class_ids=np.array(prompt.class_ids),
                spans=np.array(prompt.spans),
                seed=batch.seeds[b],
                box=batch.boxes[b],
                columns=columns,
                logits=logits[b][..., columns],
            ),
        )


def load_manifest(path: Path) -> dict:
    return json.loads(Path(path).read_text())
