"""Verify a results bundle on a CPU: checksums, cache files, every table re-derived with the current code.

The re-derivation re-runs, in dependency order, the very commands Snakemake ran for every table,
figure and scoring job of the run (recorded in the bundle), in a scratch folder where the bundled
files stand in for the run's: attention caches, GPU outputs and prepared datasets are inputs, and
everything a re-derived job writes is compared number by number with the bundled copy
(`compare.py`). Optionally, a spot check re-extracts a sample of every cache (`spot_check.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from seg4diff_repro.verify.bundle import sha256_file
from seg4diff_repro.verify.compare import Check, check_head_scores, compare_csv, compare_shard_folders
from seg4diff_repro.verify.layout import (
    BUNDLE_FILES,
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    SHARDED_COMMANDS,
    check_relative,
    is_figure,
    shard_folder,
)
from seg4diff_repro.verify.spot_check import check_cache_files, spot_check_cache

log = logging.getLogger(__name__)

DATASET_ROOT_FLAG = "--dataset-root"
# GPU work whose scores are re-derived from its bundled shards (the per-head maps are streamed, never cached).
HEAD_SCORES_COMMAND = "score-heads"


@dataclass
class Verification:
    """All checks of one bundle, grouped by section, and the verdict."""

    bundle: Path
    manifest: dict
    sections: dict[str, list[Check]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, section: str, checks: list[Check]) -> None:
        self.sections.setdefault(section, []).extend(checks)

    @property
    def checks(self) -> list[Check]:
        return [check for checks in self.sections.values() for check in checks]

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        numbers = sum(1 for c in self.sections.get("Re-derived numbers", [])
                      if isinstance(c.bundled, (int, float)) and c.tolerance != "not compared")
        files = sum(1 for _ in self.manifest.get("files", {}))
        spot = len(self.sections.get("Spot check", []))
        summary = f"{numbers} numbers re-derived, {files} files checksummed" + (f", {spot} spot-checked maps" if spot else "")
        if self.passed:
            return f"PASS: {summary}, all within tolerance" + (f" ({len(self.skipped)} steps not re-derived, listed)" if self.skipped else "")
        first = self.failures[0]
        return f"FAIL: {len(self.failures)} of {len(self.checks)} checks failed ({summary}); first: {first.file}: {first.item}"


def load_bundle(bundle: Path) -> dict:
    path = Path(bundle) / BUNDLE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {bundle} is not a results bundle (make one with `snakemake bundle`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: bundle format {manifest.get('format')!r}, this code reads format {BUNDLE_FORMAT}")
    return manifest


def check_checksums(bundle: Path, manifest: dict) -> list[Check]:
    """Every listed file present with its sha256; files in the bundle that the manifest does not list fail too."""
    root = Path(bundle) / BUNDLE_FILES
    checks, by_category = [], {}
    for path, entry in sorted(manifest["files"].items()):
        file = root / path
        if not file.is_file():
            checks.append(Check(path, "file", entry["sha256"][:16], "missing", tolerance="sha256", passed=False,
                                note="listed in bundle.json but not in the bundle"))
            continue
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            checks.append(Check(path, "sha256", entry["sha256"][:16], digest[:16], tolerance="exact", passed=False,
                                note="the file changed after bundling"))
            continue
        by_category[entry["category"]] = by_category.get(entry["category"], 0) + 1
    listed = set(manifest["files"])
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root).as_posix()
        if file.is_file() and not file.name.startswith(".") and relative not in listed:
            checks.append(Check(relative, "file", "not listed", "present", passed=False,
                                note="in the bundle but not in bundle.json"))
    checks.extend(Check(f"{count} {category} files", "sha256", "as bundled", "as bundled", tolerance="exact")
                  for category, count in sorted(by_category.items()))
    return checks


def _dataset_locations(bundle: Path, manifest: dict, data_root: Path | None) -> tuple[dict[str, Path], list[Check]]:
    """Where each dataset the run read is on this machine (bundled, or under ``data_root`` by folder name)."""
    from seg4diff_repro.datasets.layout import dataset_fingerprint

    locations, checks = {}, []
    for recorded, entry in manifest["datasets"].items():
        if entry["bundled"]:
            local = Path(bundle) / BUNDLE_FILES / recorded
        elif data_root is not None:
            local = Path(data_root) / Path(recorded).name
        else:
            checks.append(Check(recorded, "dataset", entry["fingerprint"][:16], "not available", passed=False,
                                note="not in the bundle: prepare it and pass --data-root <folder holding it>"))
            continue
        try:
            found = dataset_fingerprint(local)
        except (OSError, ValueError) as error:
            checks.append(Check(recorded, "dataset", entry["fingerprint"][:16], "unreadable", passed=False, note=str(error)))
            continue
        passed = found == entry["fingerprint"]
        checks.append(Check(recorded, "dataset fingerprint", entry["fingerprint"][:16], found[:16], tolerance="exact",
                            passed=passed, note="" if passed else f"the copy at {local} holds other files"))
        if passed:
            locations[recorded] = local.resolve()
    return locations, checks


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _argv_with_local_datasets(argv: list[str], datasets: dict[str, Path]) -> list[str]:
    argv = list(argv)
    for position, token in enumerate(argv[:-1]):
        if token == DATASET_ROOT_FLAG:
            argv[position + 1] = str(datasets[argv[position + 1]])
    return argv


def _why_not_rederived(job: dict, cache_jobs: dict[str, dict], datasets: dict[str, Path]) -> str | None:
    """Why a re-derivable job cannot be re-run here (a left-out cache, a missing dataset), or None."""
    for each in job["inputs"]:
        cache = cache_jobs.get(each)
        if cache is not None and cache.get("cache_left_out"):
            return f"its attention cache {cache['cache_folder']} was left out of the bundle"
    argv = job["argv"]
    for position, token in enumerate(argv[:-1]):
        if token == DATASET_ROOT_FLAG and argv[position + 1] not in datasets:
            return f"dataset {argv[position + 1]} is not available"
    return None


def _scratch_tree(bundle: Path, manifest: dict, scratch: Path, rederived_outputs: set[str]) -> None:
    """Link every bundled file into ``scratch`` except the outputs the re-derivation will write."""
    root = (Path(bundle) / BUNDLE_FILES).resolve()
    for path in manifest["files"]:
        if any(path == out or path.startswith(out.rstrip("/") + "/") for out in rederived_outputs):
            continue
        target = scratch / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / path, target)


def rederive(bundle: Path, manifest: dict, datasets: dict[str, Path], scratch: Path,
             verification: Verification) -> None:
    """Re-run every re-derivable job in ``scratch`` with the current code and compare what it writes."""
    from seg4diff_repro.cli import build_parser

    cache_jobs = {job["outputs"][0]: job for job in manifest["jobs"] if "cache_folder" in job}
    runnable, outputs = [], set()
    for job in manifest["jobs"]:
        if job["stage"] != "rederive":
            continue
        why = _why_not_rederived(job, cache_jobs, datasets)
        if why:
            verification.skipped.append(f"{', '.join(job['outputs'])} (rule {job['rule']}): not re-derived, {why}")
            continue
        runnable.append(job)
        for output in job["outputs"]:
            outputs.add(check_relative(output, f"output of rule {job['rule']}"))
            if job["command"] in SHARDED_COMMANDS:
                outputs.add(shard_folder(output))
    _scratch_tree(bundle, manifest, scratch, outputs)
    parser = build_parser()
    files = Path(bundle) / BUNDLE_FILES
    for job in runnable:
        argv = _argv_with_local_datasets(job["argv"], datasets)
        log.info("re-deriving %s (rule %s)", ", ".join(job["outputs"]), job["rule"])
        try:
            with _working_directory(scratch):
                args = parser.parse_args(argv)
                args.handler(args)
        except Exception as error:  # a failing command is a failed check, named by its outputs
            verification.add("Re-derived numbers", [Check(job["outputs"][0], f"rule {job['rule']}", passed=False,
                                                          note=f"re-running it failed: {type(error).__name__}: {error}")])
            continue
        checks = []
        for output in job["outputs"]:
            fresh = scratch / output
            if not fresh.exists():
                checks.append(Check(output, "file", "bundled", "not written", passed=False))
            elif output.endswith(".csv"):
                checks.extend(compare_csv(output, files / output, fresh))
            if job["command"] in SHARDED_COMMANDS:
                checks.extend(compare_shard_folders(shard_folder(output), files / shard_folder(output),
                                                    scratch / shard_folder(output)))
        verification.add("Re-derived numbers", checks)


def figure_checks(manifest: dict, verification: Verification) -> list[Check]:
    """Each figure's numbers are the CSV tables its job wrote or read; a figure with none is an image only."""
    failed_files = {check.file for check in verification.sections.get("Re-derived numbers", []) if not check.passed}
    compared = {check.file for check in verification.sections.get("Re-derived numbers", [])}
    checks = []
    for job in manifest["jobs"]:
        figures = [output for output in job["outputs"] if is_figure(output)]
        if not figures:
            continue
        tables = sorted(path for path in job["outputs"] + job["inputs"] if path.endswith(".csv"))
        behind = [table for table in tables if table in compared]
        for figure in figures:
            if behind:
                bad = [table for table in behind if table in failed_files]
                checks.append(Check(figure, "numbers", "; ".join(behind), "re-derived", tolerance="as the tables",
                                    passed=not bad, note=f"differs in {', '.join(bad)}" if bad else ""))
            else:
                what = "GPU work" if job["stage"] == "gpu" else "an image re-drawn from the bundle"
                checks.append(Check(figure, "image only", tolerance="sha256",
                                    note=f"no numbers behind it ({what}); its checksum is checked"))
    return checks


def verify_bundle(
    bundle: Path,
    *,
    data_root: Path | None = None,
    spot_check: int = 0,
    spot_seed: int = 0,
    device: str = "cpu",
    model_root: Path = Path("."),
    scratch: Path | None = None,
) -> Verification:
    """Every check of ``bundle``: checksums, cache files, re-derived numbers, figures, and a spot check of
    ``spot_check`` images per cache (0: none) on ``device``."""
    bundle = Path(bundle)
    manifest = load_bundle(bundle)
    verification = Verification(bundle, manifest)
    verification.add("Checksums", check_checksums(bundle, manifest))
    datasets, dataset_checks = _dataset_locations(bundle, manifest, data_root)
    verification.add("Datasets", dataset_checks)
    files = bundle / BUNDLE_FILES
    cache_jobs = [job for job in manifest["jobs"] if "cache_folder" in job]
    for job in cache_jobs:
        if not job["cache_left_out"]:
            verification.add("Attention caches", check_cache_files(files / job["cache_folder"], job["cache_folder"]))
    with tempfile.TemporaryDirectory(prefix="seg4diff_verify_") as temporary:
        work = Path(scratch) if scratch is not None else Path(temporary)
        if scratch is not None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        rederive(bundle, manifest, datasets, work, verification)
    for job in manifest["jobs"]:
        if job["command"] == HEAD_SCORES_COMMAND:
            for output in job["outputs"]:
                verification.add("Re-derived numbers", check_head_scores(output, files / output, files / shard_folder(output)))
    verification.add("Figures", figure_checks(manifest, verification))
    if spot_check > 0:
        for job in cache_jobs:
            if job["cache_left_out"]:
                verification.skipped.append(f"spot check of {job['cache_folder']}: its files were left out of the bundle")
                continue
            argv = job["argv"]
            dataset = argv[argv.index(DATASET_ROOT_FLAG) + 1]
            if dataset not in datasets:
                verification.skipped.append(f"spot check of {job['cache_folder']}: dataset {dataset} is not available")
                continue
            log.info("spot check: re-extracting %d images of %s on %s", spot_check, job["cache_folder"], device)
            verification.add("Spot check", spot_check_cache(
                files / job["cache_folder"], job["cache_folder"], datasets[dataset], model_root, spot_check, spot_seed,
                device,
            ))
    return verification
