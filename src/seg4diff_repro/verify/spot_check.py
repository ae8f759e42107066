"""Checks of the attention caches: their files against their manifest (CPU), and a re-extracted sample (GPU).

Every cache file stores the key of the settings, model, dataset and code that produced it and its
image's noise seed. Without a forward pass, verification checks that each file's key and seed are
what the cache's manifest says, so a file from another model, seed or dataset is caught by name. The
spot check then re-extracts a seeded random sample of images with the recorded model, settings and
seeds and compares the maps with the cached ones, within a tolerance for the model's dtype.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np

from seg4diff_repro.verify.compare import Check

# |re-extracted − cached| ≤ atol + rtol·|cached| for every map value, per model dtype. The cache stores
# float16 (a relative step of 2⁻¹⁰ ≈ 1e-3); a model running in float16 or bfloat16 adds its own rounding
# and kernel choices (docs/verification.md has the measured differences).
MAP_TOLERANCE = {
    "float32": (1e-3, 1e-2),
    "float16": (5e-3, 5e-2),
    "bfloat16": (2e-2, 1e-1),
}
# Fields of a cache file that are exact (prompt, class order and spans, seed, input box).
EXACT_FIELDS = ("prompt", "class_ids", "spans", "columns", "seed", "box")


def _key_differences(stored: str, expected: str) -> str:
    try:
        a, b = json.loads(stored), json.loads(expected)
    except ValueError:
        return "unreadable key"
    fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: file {a.get(k)!r}, manifest {b.get(k)!r}" for k in fields)


def check_cache_files(cache_folder: Path, label: str) -> list[Check]:
    """Each cache file's key and noise seed against the manifest; one check per file that fails, one summary."""
    from dataclasses import asdict

    from seg4diff_repro.attention.cache import cached_key, read_cached_image, settings_key
    from seg4diff_repro.attention.extract import ExtractionSettings, image_seed

    manifest = json.loads((cache_folder / "manifest.json").read_text())
    settings = ExtractionSettings.from_dict(manifest["settings"])
    expected = settings_key({**asdict(settings), **manifest["inputs"]})
    checks = []
    for image_id in manifest["image_ids"]:
        path = f"{label}/{image_id}.npz"
        stored = cached_key(cache_folder, image_id)
        if stored is None:
            checks.append(Check(path, "cache file", "listed in the manifest", "missing or unreadable", passed=False))
            continue
        if stored != expected:
            checks.append(Check(path, "settings key", passed=False, tolerance="exact",
                                note="not the cache's settings, model, dataset or code: " + _key_differences(stored, expected)))
            continue
        seed = read_cached_image(cache_folder, image_id).seed
        if seed != image_seed(settings.seed, image_id):
            checks.append(Check(path, "noise seed", seed, image_seed(settings.seed, image_id), tolerance="exact",
                                passed=False, note=f"not the seed rule's seed for base seed {settings.seed}"))
    if not checks:
        checks.append(Check(label, f"key and noise seed of {len(manifest['image_ids'])} cache files",
                            "as the manifest", "as the manifest", tolerance="exact"))
    return checks


def _compare_maps(path: str, name: str, cached: np.ndarray, fresh: np.ndarray, tolerance: tuple[float, float]) -> Check:
    atol, rtol = tolerance
    if cached.shape != fresh.shape:
        return Check(path, name, f"shape {cached.shape}", f"shape {fresh.shape}", passed=False)
    cached64, fresh64 = cached.astype(np.float64), fresh.astype(np.float64)
    difference = np.abs(fresh64 - cached64)
    outside = difference > atol + rtol * np.abs(cached64)
    largest = np.unravel_index(int(np.argmax(difference)), difference.shape)
    return Check(
        path, f"{name}: {cached.size} values, largest difference at {tuple(int(i) for i in largest)}",
        float(cached64[largest]), float(fresh64[largest]), difference=float(difference[largest]),
        tolerance=f"±({atol:g} + {rtol:g}·|x|)", passed=not outside.any(),
        note=f"{int(outside.sum())} values outside" if outside.any() else "",
    )


def spot_check_cache(
    cache_folder: Path, label: str, dataset_root: Path, model_root: Path, k: int, seed: int, device: str,
    batch_size: int = 4,
) -> list[Check]:
    """Re-extract ``k`` seeded random images of the cache at ``cache_folder`` and compare their maps.

    ``model_root`` is the folder relative model sources resolve against (the reviewer's checkout).
    """
    from seg4diff_repro.attention.cache import read_cached_image
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.models.common import model_fingerprint

    manifest = json.loads((cache_folder / "manifest.json").read_text())
    settings = ExtractionSettings.from_dict(manifest["settings"])
    source = Path(settings.source)
    local = source if source.is_absolute() else Path(model_root) / source
    model = local if local.is_dir() else Path(settings.source)
    recorded = manifest["inputs"]["model_fingerprint"]
    if recorded.startswith("sha256:") and not model.is_dir():  # a local folder at extraction, absent here
        return [Check(label, "model", recorded, "not here", passed=False,
                      note=f"the recorded model folder {local} does not exist: build it (`snakemake {settings.source}` "
                           "for a toy model) or pass --model-root with the folder that holds it")]
    lora = None  # a MAGNET variant's adapter folder, resolved as the model's
    if settings.lora is not None:
        lora = Path(settings.lora) if Path(settings.lora).is_absolute() else Path(model_root) / settings.lora
    try:
        found = model_fingerprint(model, lora=lora)
    except Exception as error:
        return [Check(label, "model", recorded, None, passed=False,
                      note=f"the recorded model {settings.source} is not available here ({error}): build or download it")]
    if found != recorded:
        return [Check(label, "model fingerprint", recorded, found, tolerance="exact", passed=False,
                      note=f"the model at {model} is not the one this cache was extracted with")]
    rng = random.Random(f"{seed}:{label}")
    sample = sorted(rng.sample(manifest["image_ids"], min(k, len(manifest["image_ids"]))))
    settings = ExtractionSettings.from_dict({**manifest["settings"], "source": str(model),
                                             "lora": None if lora is None else str(lora)})
    with tempfile.TemporaryDirectory(prefix="spot_check_") as scratch:
        extract_attention(settings, dataset_root, Path(scratch), device=device, batch_size=batch_size, image_ids=sample)
        tolerance = MAP_TOLERANCE.get(settings.dtype, MAP_TOLERANCE["bfloat16"])
        checks = []
        for image_id in sample:
            path = f"{label}/{image_id}.npz"
            cached, fresh = read_cached_image(cache_folder, image_id), read_cached_image(Path(scratch), image_id)
            for field in EXACT_FIELDS:
                a, b = np.asarray(getattr(cached, field)), np.asarray(getattr(fresh, field))
                if a.shape != b.shape or not (a == b).all():
                    checks.append(Check(path, field, str(getattr(cached, field)), str(getattr(fresh, field)),
                                        tolerance="exact", passed=False))
            checks.append(_compare_maps(path, "post-softmax I2T maps", cached.i2t, fresh.i2t, tolerance))
            if cached.logits is not None:
                checks.append(_compare_maps(path, "pre-softmax logits", cached.logits, fresh.logits, tolerance))
    return checks
