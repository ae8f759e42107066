"""The results bundle: what a run produced and what is needed to check it, with a sha256 for every file.

A bundle is a folder::

    bundle.json       the manifest: jobs (rule, command, inputs, outputs), models and datasets by content
                      fingerprint, commit and dirty flag, machine, sizes, and sha256 + size of every file
    config.yaml       the config the run used
    environment.txt   the Python environment, one ``name==version`` a line
    files/            the run's files under their paths in the workflow folder: tables, figures, the
                      outputs of every job they depend on (scores, scoring shards, attention caches,
                      generated images), and the prepared datasets that fit under a size limit

The jobs come from Snakemake's own records (`records.py`), walked back from the targets; the walk stops at
the sources (models, datasets), which are recorded by fingerprint instead of copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from seg4diff_repro.atomic import atomic_write_json, replace_folder_atomically
from seg4diff_repro.progress import progress
from seg4diff_repro.provenance import provenance
from seg4diff_repro.verify.layout import (
    BUNDLE_CONFIG,
    BUNDLE_ENVIRONMENT,
    BUNDLE_FILES,
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    CACHE_COMMANDS,
    GPU_COMMANDS,
    REDERIVED_COMMANDS,
    SHARDED_COMMANDS,
    SOURCE_COMMANDS,
    check_relative,
    in_tables,
    is_figure,
    is_table,
    shard_folder,
)
from seg4diff_repro.verify.records import Job, read_jobs

log = logging.getLogger(__name__)

LEAVE_OUT_CACHES = ("none", "figure-only", "all")
DATASET_MANIFEST = "manifest.json"  # datasets/layout.py MANIFEST_FILE
MODEL_INDEX = "model_index.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(path: Path) -> list[Path]:
    """The files of a folder (hidden ones aside: staging leftovers), the file itself, or none if absent."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.is_file() else []


class _Walk:
    """The jobs the targets depend on, in dependency order, and the source files they read."""

    def __init__(self, workdir: Path, jobs: dict[str, Job], targets: list[str]) -> None:
        self.workdir, self.by_output = workdir, jobs
        self.order: list[Job] = []
        self.sources: set[str] = set()
        self._seen: set[int] = set()
        for target in targets:
            if target not in jobs:
                raise ValueError(
                    f"{target}: Snakemake has no record of the job that made it in {workdir}; "
                    f"build it with snakemake (not by hand) before bundling"
                )
            self._visit(target)

    def _visit(self, path: str) -> None:
        job = self.by_output.get(path)
        if job is None or job.command in SOURCE_COMMANDS:
            self.sources.add(path)
            return
        if id(job) in self._seen:
            return
        self._seen.add(id(job))
        if job.command not in REDERIVED_COMMANDS | GPU_COMMANDS:
            raise ValueError(
                f"{path} was made by rule {job.rule} running {job.shellcmd[:80]!r}, which the bundle does not know "
                "how to treat: add its command to one of the classes in seg4diff_repro/verify/layout.py"
            )
        for each in job.inputs:
            self._visit(each)
        self.order.append(job)

    def produces_table(self, job: Job, memo: dict[int, bool] | None = None) -> bool:
        """Whether ``job`` or a job reading its outputs writes a table (the caches a table needs)."""
        memo = {} if memo is None else memo
        if id(job) not in memo:
            memo[id(job)] = False
            readers = [other for other in self.order if set(other.inputs) & set(job.outputs)]
            memo[id(job)] = any(is_table(o) for o in job.outputs) or any(self.produces_table(r, memo) for r in readers)
        return memo[id(job)]


def _existing_outputs(workdir: Path, job: Job) -> list[str]:
    return sorted(output for output in job.outputs if (workdir / output).exists())


def _cache_folders(job: Job) -> list[str]:
    """The cache folders of an extraction job: one per manifest.json it writes (a sweep job writes one per timestep)."""
    return [str(Path(output).parent) for output in job.outputs if Path(output).name == "manifest.json"]


def _source_kind(workdir: Path, path: str) -> str:
    """'dataset' (a prepared dataset's manifest), 'model' (a model folder or its index) or 'file'."""
    full = workdir / path
    if full.name == MODEL_INDEX or (full.is_dir() and (full / MODEL_INDEX).is_file()):
        return "model"
    if full.name == DATASET_MANIFEST and (full.parent / "classes.json").is_file():
        return "dataset"
    return "file"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files_under(folder))


def python_environment() -> list[str]:
    """The installed distributions as ``name==version`` lines, sorted (a lock of the environment)."""
    names = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            names[name.lower()] = f"{name}=={dist.version}"
    return [names[key] for key in sorted(names)]


def machine() -> dict:
    """Python, OS, CPU, and where present torch, CUDA, cuDNN, the GPUs and the NVIDIA driver."""
    info: dict = {
        "python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
        "machine": platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        info["torch"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def _models_of(workdir: Path, walk: _Walk, jobs: list[Job]) -> dict[str, dict]:
    """Every model the GPU work used: its content fingerprint (hub: the resolved commit) and description."""
    from seg4diff_repro.models.common import describe_model_source, model_fingerprint

    models: dict[str, dict] = {}
    for job in jobs:
        if job.command not in CACHE_COMMANDS:
            continue
        for folder in _cache_folders(job):
            manifest = json.loads((workdir / folder / "manifest.json").read_text())
            source = manifest["settings"]["source"]
            models.setdefault(source, {"source": source, "description": manifest.get("model", {}),
                                       "recorded_by_caches": {}})
            models[source]["recorded_by_caches"][folder] = manifest.get("inputs", {}).get("model_fingerprint")
    for path in walk.sources:
        if _source_kind(workdir, path) == "model":
            folder = str(Path(path).parent) if Path(path).name == MODEL_INDEX else path
            models.setdefault(folder, {"source": folder, "recorded_by_caches": {}})
            models[folder]["description"] = describe_model_source(workdir / folder)
    for source, entry in models.items():
        local = workdir / source
        try:
            entry["fingerprint"] = model_fingerprint(local if local.is_dir() else source)
        except Exception as error:  # a hub model missing from this machine's cache: the caches' record stands
            entry["fingerprint"] = None
            entry["fingerprint_error"] = str(error)
    return models


def make_bundle(
    workdir: Path,
    targets: list[str],
    out: Path,
    config: dict,
    *,
    leave_out_caches: str = "none",
    dataset_limit_mb: float = 200.0,
) -> dict:
    """Pack ``targets`` (paths relative to ``workdir``) and everything needed to check them into ``out``.

    ``leave_out_caches``: "figure-only" leaves out the per-image attention files of caches no table needs
    (e.g. those only overlays read), "all" those of every cache (tables are then re-derived from the
    bundled scores only). Prepared datasets up to ``dataset_limit_mb`` are copied; larger ones are
    recorded by fingerprint, for the reviewer to prepare.
    """
    if leave_out_caches not in LEAVE_OUT_CACHES:
        raise ValueError(f"leave_out_caches={leave_out_caches!r}: use one of {LEAVE_OUT_CACHES}")
    workdir = Path(workdir).resolve()
    walk = _Walk(workdir, read_jobs(workdir), [check_relative(t, "target") for t in targets])

    files: dict[str, str] = {}  # path in the run -> category
    job_entries, left_out = [], []
    for job in walk.order:
        outputs = _existing_outputs(workdir, job)
        for output in outputs:
            check_relative(output, f"output of rule {job.rule}")
            category = "table" if in_tables(output) else "figure" if is_figure(output) else "result"
            for path in _files_under(workdir / output):
                files[path.relative_to(workdir).as_posix()] = category
        if job.command in SHARDED_COMMANDS:
            for output in outputs:
                for path in _files_under(workdir / shard_folder(output)):
                    files[path.relative_to(workdir).as_posix()] = "scoring shards"
        entry = {
            "rule": job.rule, "command": job.command, "shellcmd": job.shellcmd, "argv": job.argv(),
            "inputs": job.inputs, "outputs": outputs,
            "stage": "rederive" if job.command in REDERIVED_COMMANDS else "gpu",
        }
        if job.command in CACHE_COMMANDS:
            keep = leave_out_caches == "none" or (leave_out_caches == "figure-only" and walk.produces_table(job))
            for folder in _cache_folders(job):
                cache_files = [p for p in _files_under(workdir / folder) if p.name != "manifest.json"]
                if keep:
                    files.update({p.relative_to(workdir).as_posix(): "attention cache" for p in cache_files})
                else:
                    left_out.append({"cache": folder, "files": len(cache_files),
                                     "bytes": sum(p.stat().st_size for p in cache_files)})
            entry.update(cache_folder=_cache_folders(job)[0], cache_folders=_cache_folders(job), cache_left_out=not keep)
        job_entries.append(entry)

    datasets, plain_sources = {}, []
    for path in sorted(walk.sources):
        kind = _source_kind(workdir, path)
        if kind == "dataset":
            from seg4diff_repro.datasets.layout import dataset_fingerprint

            root = workdir / Path(path).parent
            size = _folder_bytes(root)
            bundled = size <= dataset_limit_mb * 1e6 and not Path(path).is_absolute()
            datasets[str(Path(path).parent)] = {"fingerprint": dataset_fingerprint(root), "bytes": size, "bundled": bundled}
            if bundled:
                files.update({p.relative_to(workdir).as_posix(): "dataset" for p in _files_under(root)})
        elif kind == "file" and (workdir / path).is_file() and not Path(path).is_absolute():
            plain_sources.append(path)
            files[path] = "input"

    out = Path(out)
    with replace_folder_atomically(out) as staging:
        listing = {}
        for path, category in progress(sorted(files.items()), desc="copying into the bundle", unit="file"):
            target = staging / BUNDLE_FILES / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(workdir / path, target)  # a copy, never a link: editing the bundle leaves the run alone
            listing[path] = {"sha256": sha256_file(target), "bytes": target.stat().st_size, "category": category}
        sizes: dict[str, int] = {}
        for entry in listing.values():
            sizes[entry["category"]] = sizes.get(entry["category"], 0) + entry["bytes"]
        (staging / BUNDLE_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (staging / BUNDLE_ENVIRONMENT).write_text("\n".join(python_environment()) + "\n")
        manifest = {
            "format": BUNDLE_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance("package"),  # version, code fingerprint, commit and dirty flag
            "machine": machine(),
            "targets": sorted(targets),
            "jobs": job_entries,
            "models": _models_of(workdir, walk, walk.order),
            "datasets": datasets,
            "plain_inputs": plain_sources,
            "left_out": left_out,
            "size": {"bytes": sum(sizes.values()), "by_category": sizes},
            "files": listing,
        }
        atomic_write_json(staging / BUNDLE_MANIFEST, manifest)
    total = manifest["size"]["bytes"]
    log.info("bundle %s: %d files, %.1f MB (%s)%s", out, len(listing), total / 1e6,
             ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())),
             f"; left out {len(left_out)} caches" if left_out else "")
    return manifest
