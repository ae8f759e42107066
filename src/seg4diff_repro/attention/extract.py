"""Extraction stage: run the Seg4Diff forward pass over a dataset and cache the I2T maps per image."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from seg4diff_repro.atomic import remove_leftover_temp_files
from seg4diff_repro.attention.cache import CachedImage, cached_key, settings_key, write_cached_image
from seg4diff_repro.attention.recorder import AttentionRecorder, stop_after_layer
# Torch-free, for the gather jobs; re-exported here, where the extraction's other names are.
from seg4diff_repro.attention.shards import ExtractionSettings, gather_shards, parse_shard, shard_positions  # noqa: F401
from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.layout import atomic_write_json, dataset_fingerprint
from seg4diff_repro.models.preprocess import crop_to_box, prepare_image
from seg4diff_repro.models import load_adapter
from seg4diff_repro.models.common import adapter_record, describe_model_source, model_fingerprint
from seg4diff_repro.progress import progress
from seg4diff_repro.provenance import code_fingerprint, provenance
from seg4diff_repro.segmentation.prompts import build_class_prompt, prompt_class_ids, prompt_label, window_spans

log = logging.getLogger(__name__)

SEED_RULE = "per-image noise seed = sha256('<seed>:<image_id>')[:8] >> 1"


def image_seed(base_seed: int, image_id: str) -> int:
    """Noise seed of one image: fixed by the base seed and the image id, whatever the batching."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def extraction_inputs(settings: ExtractionSettings, dataset_root: Path) -> dict:
    """What the cached maps were computed from besides the settings: the extraction code, the model's
    weights (with the MAGNET adapter's, if any) and the prepared dataset's files, each by content, so that a change
    to any of them (a retrained adapter too) recomputes."""
    return {
        "code_fingerprint": code_fingerprint("extraction"),
        "model_fingerprint": model_fingerprint(settings.source, settings.revision, lora=settings.lora),
        "dataset_fingerprint": dataset_fingerprint(dataset_root),
    }


@dataclass(frozen=True)
class TimestepCache:
    """One cache that a multi-timestep extraction fills: its settings (timestep, layers) and its folder."""

    settings: ExtractionSettings
    out_dir: Path


# What may differ between the caches of one multi-timestep run; everything else is shared (same images,
# prompts, latents and text embeddings).
_PER_CACHE_FIELDS = ("timestep", "layers")


def extract_attention(
    settings: ExtractionSettings,
    dataset_root: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    batch_size: int | str = 8,
    num_workers: int | None = None,
    image_ids: list[str] | None = None,
) -> dict:
    """Cache the head-mean I2T maps of every image of the split in ``out_dir``; return the manifest.

    Images whose cache file already carries the current settings key are skipped, so an interrupted
    run resumes without recomputing them. ``image_ids`` restricts the run to those images of the split
    (a reviewer's spot check re-extracts a sample); the manifest then lists only them.
    """
    caches = [TimestepCache(settings, Path(out_dir))]
    return extract_attention_timesteps(
        caches, dataset_root, device=device, batch_size=batch_size, num_workers=num_workers, image_ids=image_ids
    )[0]


def extract_shard(
    caches: list[TimestepCache],
    dataset_root: Path,
    shard: tuple[int, int],
    *,
    device: str = "cpu",
    batch_size: int | str = 8,
    num_workers: int | None = None,
) -> dict:
    """Fill ``caches`` for one shard of the split's images (`shard_positions`); return the shard's record.

    Shards of the same caches write disjoint files into the same folders and may run at once, on different
    GPUs or machines; `gather_shards` checks them and writes each cache's manifest. The record holds, per
    cache, what its manifest needs and the shard's images, and once the run's operational settings (device,
    batch size, host, GPU, time): recorded, but not part of any key.
    """
    from seg4diff_repro.gpu_slots import run_record

    started = time.time()
    records, computed = extract_attention_timesteps(
        caches, dataset_root, device=device, batch_size=batch_size, num_workers=num_workers, shard=shard
    )
    run = run_record(device, batch_size=batch_size, num_workers=num_workers, images_computed=computed,
                     started_at=round(started, 3), wall_s=round(time.time() - started, 3))
    return {"shard": list(shard), "caches": records, "run": run}


def extract_attention_timesteps(
    caches: list[TimestepCache],
    dataset_root: Path,
    *,
    device: str = "cpu",
    batch_size: int | str = 8,
    num_workers: int | None = None,
    writer_threads: int = 4,
    adapter=None,
    image_ids: list[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[dict] | tuple[list[dict], int]:
    """Fill several caches of the same images that differ only in timestep (and recorded layers).

    Per image the VAE and the text encoders run once, whatever the number of timesteps: each batch is
    encoded once, then noised to each timestep and run through the transformer. The maps equal those
    of one ``extract_attention`` run per timestep (same images, seeds and batches). Images are read,
    resized and prompted by loader worker processes ahead of the GPU, and cache files are compressed
    and written by a thread pool while the next forward pass runs. ``batch_size="auto"`` takes the
    largest batch that fits (`auto_batch_size`). ``adapter``: an already loaded model of the caches' settings
    (benchmarks time the loop without the load). ``image_ids``: only those images of the split, as in
    ``extract_attention``. Returns the manifests, in the order of ``caches``. ``shard``: only that shard's images
    (`shard_positions`); nothing is written but the cache files, and the result is the caches' shard records
    (for `gather_shards`) with the number of images computed (`extract_shard` writes them).
    """
    if not caches:
        return []
    base = _shared_settings(caches)
    for cache in caches:
        if removed := remove_leftover_temp_files(cache.out_dir):
            log.info("%s: removed %d temp files of a killed run", cache.out_dir, removed)
    dataset = SegmentationDataset(dataset_root, base.split, background=base.background, limit=base.limit)
    if adapter is None:
        adapter = load_adapter(base.backbone, base.source, base.dtype, device, base.revision, lora=base.lora,
                               **dict(base.model_options))
    inputs = extraction_inputs(base, dataset_root)
    positions = range(len(dataset)) if image_ids is None else _positions(dataset.ids, image_ids, dataset_root)
    if shard is not None:
        positions = shard_positions(len(dataset), shard)
    plans = []
    for cache in caches:
        noising = adapter.noising(cache.settings.timestep, cache.settings.num_steps)
        layers = list(range(adapter.num_layers)) if cache.settings.layers is None else list(cache.settings.layers)
        key = settings_key({**asdict(cache.settings), **inputs})
        todo = {i for i in positions if cached_key(cache.out_dir, dataset.ids[i]) != key}
        log.info(
            "%s%s: %d of %d images to extract (t = %d of %d: index %d, sigma %.5f)",
            cache.out_dir, "" if shard is None else " shard %d of %d" % shard, len(todo), len(positions),
            noising.k, noising.num_steps, noising.index, noising.sigma,
        )
        plans.append(_CachePlan(cache, noising, layers, key, todo))
    indices = sorted(set().union(*(plan.todo for plan in plans)))
    if indices:
        if batch_size == "auto":
            widest = max(plans, key=lambda plan: len(plan.layers))
            batch_size = auto_batch_size(adapter, len(widest.layers), widest.noising, record=("i2t", "logits"))
            log.info("batch size %d (auto)", batch_size)
        loader = _prefetching_loader(adapter, dataset, indices, base, int(batch_size), device, num_workers)
        with CacheWriter(writer_threads) as writer:
            for batch in progress(loader, desc="extract attention", unit="batch"):
                _extract_prepared_batch(adapter, batch, dataset.class_names, base, plans, writer)
    manifests = []
    for plan in plans:
        manifest = {
            "settings": asdict(plan.cache.settings),
            "noising": asdict(plan.noising),
            "layers": plan.layers,
            "token_grid": list(adapter.token_grid),
            "text_tokens": adapter.prompt_tokens,
            "image_ids": [dataset.ids[i] for i in positions],
            "class_names": dataset.class_names,
            "ignore_index": dataset.ignore_index,
            "model": describe_model_source(base.source),
            "lora": None if base.lora is None else adapter_record(base.lora),  # MAGNET run, protocol, checkpoint, recipe
            "inputs": inputs,
            "provenance": provenance("extraction"),
            "seed_rule": SEED_RULE,
        }
        if shard is not None:  # a shard's record: gather_shards writes the manifest
            manifest |= {"out_dir": str(plan.cache.out_dir), "key": hashlib.sha256(plan.key.encode()).hexdigest()}
        else:
            atomic_write_json(plan.cache.out_dir / "manifest.json", manifest)
        manifests.append(manifest)
    return (manifests, len(indices)) if shard is not None else manifests


def _positions(ids: list[str], wanted: list[str], dataset_root: Path) -> list[int]:
    index = {image_id: position for position, image_id in enumerate(ids)}
    missing = [image_id for image_id in wanted if image_id not in index]
    if missing:
        raise ValueError(f"images {missing[:5]} are not in the split of {dataset_root}: check the dataset's version")
    return [index[image_id] for image_id in wanted]


def _shared_settings(caches: list[TimestepCache]) -> ExtractionSettings:
    first = asdict(caches[0].settings)
    for cache in caches[1:]:
        other = asdict(cache.settings)
        differing = sorted(k for k in first if k not in _PER_CACHE_FIELDS and first[k] != other[k])
        if differing:
            raise ValueError(
                f"caches of one multi-timestep extraction may differ only in {_PER_CACHE_FIELDS}; "
                f"{cache.out_dir} differs from {caches[0].out_dir} in {differing}"
            )
    return caches[0].settings


@dataclass
class _CachePlan:
    cache: TimestepCache
    noising: object
    layers: list[int]
    key: str
    todo: set[int]


def auto_batch_size(adapter, n_layers: int, noising, *, record: tuple[str, ...], limit: int = 16) -> int:
    """The largest batch (at most ``limit``) whose forward pass and recorded maps fit in 80 % of free memory.

    The recorded maps per image are the recorder memory guard's estimate; the forward's own activation
    memory per image is measured with one probe forward at batch 1 (CUDA). On a CPU the batch is 4.
    """
    if adapter.device.type != "cuda":
        return 4
    rows, cols = adapter.token_grid
    n_image = rows * cols
    probe = AttentionRecorder(adapter.transformer, layers=[0], record=record, heads="mean",
                              text_tokens=adapter.prompt_tokens)
    recorded = probe.estimate_bytes(1, n_image, adapter.num_text_tokens) * n_layers
    channels = adapter.transformer.config.in_channels
    if adapter.backbone == "flux":
        channels = adapter.latent_channels
    side = adapter.image_size // adapter.pipe.vae_scale_factor
    latents = torch.zeros(1, channels, side, side, device=adapter.device, dtype=adapter.dtype)
    embeds, pooled = adapter.encode_prompts([""])
    torch.cuda.synchronize(adapter.device)
    torch.cuda.reset_peak_memory_stats(adapter.device)
    before = torch.cuda.memory_allocated(adapter.device)
    adapter.forward(latents, noising, embeds, pooled)
    torch.cuda.synchronize(adapter.device)
    activations = torch.cuda.max_memory_allocated(adapter.device) - before
    free = 0.8 * torch.cuda.mem_get_info(adapter.device)[0]
    return int(max(1, min(limit, free // (2 * activations + recorded))))  # 2x: VAE and copies beside the forward


class _PreparedSamples(torch.utils.data.Dataset):
    """Images read, resized and prompted as the official evaluation does: the work the loader workers do."""

    def __init__(self, adapter, dataset: SegmentationDataset, indices: list[int], settings: ExtractionSettings):
        self.dataset, self.indices, self.settings = dataset, indices, settings
        self.image_size, self.tokenizer, self.prompt_start = adapter.image_size, adapter.tokenizer, adapter.prompt_start
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        sample = self.dataset[self.indices[position]]
        return prepare_sample(sample, self.class_names, self.settings, self.image_size, self.tokenizer,
                              self.prompt_start) | {"index": self.indices[position]}


def prepare_sample(sample, class_names, settings: ExtractionSettings, image_size: int, tokenizer, prompt_start) -> dict:
    """One sample as the forward pass takes it: pixels at the model size, the region shown, prompt, noise seed.

    The oracle class set is read from the label as ``settings.prompt_classes_from`` says (official: resized).
    """
    pixels, box = prepare_image(sample.image, image_size, settings.short_side, settings.resize, settings.pad_multiple)
    prompt = build_class_prompt(
        prompt_class_ids(
            prompt_label(crop_to_box(sample.label, box), settings.short_side, settings.prompt_classes_from),
            len(class_names), settings.prompt,
        ),
        class_names,
        tokenizer,
        settings.background_name,
        start=prompt_start,
    )
    return {"image_id": sample.image_id, "pixels": pixels, "box": box, "prompt": prompt,
            "seed": image_seed(settings.seed, sample.image_id)}


def _collate(items: list[dict]) -> dict:
    return {"pixels": torch.stack([item["pixels"] for item in items])} | {
        name: [item[name] for item in items] for name in ("index", "image_id", "box", "prompt", "seed")
    }


def _prefetching_loader(adapter, dataset, indices, settings, batch_size: int, device: str, num_workers: int | None):
    """Batches prepared by worker processes (decoding and resizing off the GPU's critical path), pinned for CUDA."""
    if num_workers is None:  # SEG4DIFF_LOADER_WORKERS overrides, e.g. 0 where /dev/shm is too small for workers
        default = min(4, len(os.sched_getaffinity(0)) - 1) if torch.device(device).type == "cuda" else 0
        num_workers = int(os.environ.get("SEG4DIFF_LOADER_WORKERS", default))
    return torch.utils.data.DataLoader(
        _PreparedSamples(adapter, dataset, indices, settings),
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, num_workers),
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


class CacheWriter:
    """Compress and write cache files on a thread pool while the GPU computes the next batch.

    A submitted entry's tensors may still be in flight from the GPU: the writer waits on the CUDA event
    recorded after their copy. At most ``max_pending`` entries wait, so host memory stays bounded; the
    first failed write is raised in the caller (at the next submit or on exit).
    """

    def __init__(self, threads: int = 4, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def submit(self, out_dir: Path, make_entry, ready: torch.cuda.Event | None) -> None:
        self._raise_failures()
        self._slots.acquire()

        def write() -> None:
            try:
                if ready is not None:
                    ready.synchronize()
                write_cached_image(out_dir, make_entry())
            finally:
                self._slots.release()

        self._futures.append(self._pool.submit(write))

    def _raise_failures(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            for future in self._futures:
                future.result()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start a copy to host memory (pinned, asynchronous from a GPU); the caller records an event after it."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


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
        prepare_sample(s, class_names, settings, adapter.image_size, adapter.tokenizer, adapter.prompt_start)
        for s in samples
    ]
    latents = adapter.encode_images(torch.stack([p["pixels"] for p in prepared]))
    prompt_embeds, pooled = adapter.encode_prompts([p["prompt"].text for p in prepared])
    seeds = [p["seed"] for p in prepared]
    recorder = _record(adapter, latents, noising, seeds, prompt_embeds, pooled, layers, record, heads)
    return RecordedBatch([p["prompt"] for p in prepared], [p["box"] for p in prepared], seeds, recorder)


def _record(adapter, latents, noising, seeds, prompt_embeds, pooled, layers, record, heads) -> AttentionRecorder:
    noisy = adapter.noise_latents(latents, noising, seeds)
    # Only the maps are kept, so the blocks after the last recorded layer need not run.
    with AttentionRecorder(
        adapter.transformer, layers=layers, record=record, heads=heads, text_tokens=adapter.prompt_tokens
    ) as recorder, stop_after_layer(adapter.transformer, max(layers)):
        adapter.forward(noisy, noising, prompt_embeds, pooled)
    return recorder


def _extract_prepared_batch(adapter, batch: dict, class_names, settings, plans: list[_CachePlan], writer) -> None:
    """Encode the batch once, then run and cache every timestep that still lacks one of its images."""
    pixels = batch["pixels"].to(adapter.device, non_blocking=True)
    latents = adapter.encode_images(pixels)
    prompt_embeds, pooled = adapter.encode_prompts([p.text for p in batch["prompt"]])
    for plan in plans:
        rows = [b for b, index in enumerate(batch["index"]) if index in plan.todo]
        if not rows:
            continue
        select = torch.tensor(rows, device=latents.device)
        recorder = _record(
            adapter, latents.index_select(0, select), plan.noising, [batch["seed"][b] for b in rows],
            prompt_embeds.index_select(0, select), pooled.index_select(0, select), plan.layers,
            ("i2t", "logits"), "mean",
        )
        i2t = torch.stack([recorder.i2t[layer][:, 0] for layer in plan.layers], dim=1)
        logits = torch.stack([recorder.logits_i2t[layer][:, 0] for layer in plan.layers], dim=1)
        for position, b in enumerate(rows):
            prompt = batch["prompt"][b]
            if settings.prompt == "null":  # unsupervised segmentation reads every position of the window
                columns = np.arange(adapter.prompt_tokens)
            else:
                # The official rule's columns: a superset of the corrected rule's (segmentation.prompts.window_spans).
                spans = window_spans(prompt.spans, adapter.prompt_tokens, "official")
                columns = np.unique(np.concatenate([np.arange(s, e) for s, e in spans] + [[]])).astype(int)
            index = torch.from_numpy(columns).to(i2t.device)
            # The cache holds float16: cast on the device, so that half the bytes cross to the host.
            maps = _to_host(i2t[position].index_select(-1, index).half())
            scores = _to_host(logits[position].index_select(-1, index).half())
            ready = None
            if i2t.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()

            def entry(b=b, prompt=prompt, columns=columns, maps=maps, scores=scores, plan=plan) -> CachedImage:
                return CachedImage(
                    image_id=batch["image_id"][b],
                    key=plan.key,
                    layers=np.array(plan.layers),
                    i2t=maps.numpy(),
                    token_grid=adapter.token_grid,
                    prompt=prompt.text,
                    class_ids=np.array(prompt.class_ids),
                    spans=np.array(prompt.spans),
                    seed=batch["seed"][b],
                    box=batch["box"][b],
                    columns=columns,
                    logits=scores.numpy(),
                )

            writer.submit(plan.cache.out_dir, entry, ready)


