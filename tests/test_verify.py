"""Reviewer verification (issue 14): a bundle of a toy run verifies, also in a fresh copy of the workflow, and
each kind of tampering fails with a message naming the file and the number."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seg4diff_repro.attention.cache import read_cached_image, write_cached_image
from seg4diff_repro.verify.compare import TABLE_ABS_TOL, compare_csv, compare_npz
from seg4diff_repro.verify.records import read_jobs
from seg4diff_repro.verify.verify import Verification, verify_bundle
from test_workflow import copy_workflow, snakemake

TABLE = "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv"
CONTROL_TABLE = "paper_tables/toy/per_layer_toy_sd3_random_toy_objects_t8.csv"
UNSUPERVISED = "paper_tables/toy/unsupervised_toy_sd3_toy_stuff_t8.csv"
FIGURE = "figures/toy/per_layer_toy_sd3_toy_objects_t8.png"
CACHE = "results/attention/toy_sd3/toy_objects/t8"
CONTROL_CACHE = "results/attention/toy_sd3_random/toy_objects/t8"
SHARD = "results/segmentation/toy_sd3/toy_objects/t8/per_layer.shards/shard_00000/official_layer_000.npz"
# Only what these tables need: a few jobs instead of the whole default run.
TARGETS = f"verification={{targets: [{TABLE}, {CONTROL_TABLE}, {UNSUPERVISED}, {FIGURE}]}}"


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A small toy run, bundled and verified by `snakemake bundle verify`: (workflow folder, bundle)."""
    # No timestep sweep: the t = 8 caches are then their own extraction jobs' (results/attention/<m>/<d>/t8).
    workdir = copy_workflow(tmp_path_factory.mktemp("verify_run"), analyses={"timestep_sweep": {"timesteps": []}})
    snakemake(workdir, "bundle", "verify", "--config", TARGETS)
    return workdir, workdir / "bundle"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tampered_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def _rehash(bundle: Path, *paths: str) -> None:
    """What a careful forger does: record the tampered files' new checksums in bundle.json."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    for path in paths:
        manifest["files"][path]["sha256"] = _sha256(bundle / "files" / path)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _failure_text(verification: Verification) -> str:
    return "\n".join(f"{c.file} | {c.item} | {c.bundled} | {c.rederived} | {c.note}" for c in verification.failures)


@pytest.mark.slow
def test_the_bundle_of_a_toy_run_verifies_and_states_every_file_and_its_size(toy_bundle):
    workdir, bundle = toy_bundle
    manifest = json.loads((bundle / "bundle.json").read_text())
    # Every file of the run that a table needs is there, with the sha256 of the run's own file.
    for path in (TABLE, UNSUPERVISED, FIGURE, SHARD, f"{CACHE}/manifest.json", f"{CACHE}/toy_val_00000.npz",
                 "data/prepared/toy_world_objects/manifest.json"):
        assert manifest["files"][path]["sha256"] == _sha256(workdir / path), path
    assert manifest["size"]["bytes"] == sum(p.stat().st_size for p in (bundle / "files").rglob("*") if p.is_file())
    from seg4diff_repro.provenance import git_state

    assert {k: manifest["provenance"][k] for k in ("commit", "dirty")} == git_state()  # this checkout's commit
    assert "torch==" in (bundle / "environment.txt").read_text()
    model = manifest["models"]["models/toy_sd3"]
    assert model["fingerprint"] == model["recorded_by_caches"][CACHE]  # the committed model made the cache
    rules = {job["rule"]: job["stage"] for job in manifest["jobs"]}
    assert rules["extract_attention"] == "gpu" and rules["score_layers"] == "rederive"
    assert "prepare_toy_world" not in rules  # a source: recorded by fingerprint, not a job of the bundle
    # The report lists the table's numbers, re-derived equal to the run's table, and passes.
    report = (workdir / "verification/verification.md").read_text()
    assert report.splitlines()[2].startswith("**PASS")
    table = pd.read_csv(workdir / TABLE)
    checks = json.loads((workdir / "verification/verification.json").read_text())["checks"]["Re-derived numbers"]
    mious = {c["item"]: c for c in checks if c["file"] == TABLE and c["item"].endswith(", mIoU")}
    assert len(mious) == len(table)
    first = mious[next(iter(mious))]
    assert float(first["bundled"]) == pytest.approx(table.loc[0, "mIoU"]) and first["status"] == "pass"
    assert (workdir / "verification/verification.html").read_text().count("<tr") > len(checks)


@pytest.mark.slow
def test_a_received_bundle_verifies_in_a_fresh_copy_of_the_workflow(toy_bundle, tmp_path):
    _, bundle = toy_bundle
    fresh = copy_workflow(tmp_path)  # no run, no results: only the code and the committed model
    snakemake(fresh, "verify", "--config", f"verification={{received_bundle: {bundle}}}")
    assert not (fresh / "results").exists() and not (fresh / "bundle").exists()  # nothing re-run, nothing bundled
    assert (fresh / "verification/verification.md").read_text().splitlines()[2].startswith("**PASS")


@pytest.mark.slow
def test_a_tampered_table_number_fails_naming_the_file_and_the_number(toy_bundle, tmp_path):
    workdir, bundle = toy_bundle
    copy = _tampered_copy(bundle, tmp_path)
    table = pd.read_csv(copy / "files" / TABLE)
    true_value = table.loc[2, "mIoU"]
    table.loc[2, "mIoU"] = true_value + 0.05
    table.to_csv(copy / "files" / TABLE, index=False, float_format="%.2f")

    plain = verify_bundle(copy, model_root=workdir)  # the checksum gives it away
    assert any(c.file == TABLE and c.item == "sha256" for c in plain.failures), _failure_text(plain)

    _rehash(copy, TABLE)  # a consistent forgery: only the re-derivation catches it
    forged = verify_bundle(copy, model_root=workdir)
    assert not forged.passed
    [cell] = [c for c in forged.failures if c.file == TABLE]
    assert cell.item.startswith("row 3 (") and cell.item.endswith(", mIoU") and "layer=2" in cell.item
    assert cell.bundled == pytest.approx(true_value + 0.05) and cell.rederived == pytest.approx(true_value)
    assert forged.verdict().startswith("FAIL") and TABLE in forged.verdict()


@pytest.mark.slow
def test_a_tampered_cache_file_fails_in_the_scores_and_in_the_spot_check(toy_bundle, tmp_path):
    workdir, bundle = toy_bundle
    copy = _tampered_copy(bundle, tmp_path)
    folder = copy / "files" / CACHE
    # An image with two classes in its prompt, whose maps are inverted: each pixel goes to the other class.
    entry = next(e for e in map(lambda p: read_cached_image(folder, p.stem), sorted(folder.glob("*.npz")))
                 if len(e.class_ids) >= 2)
    entry.i2t = (entry.i2t.max() - entry.i2t).astype(entry.i2t.dtype)
    write_cached_image(folder, entry)
    npz = f"{CACHE}/{entry.image_id}.npz"

    plain = verify_bundle(copy, model_root=workdir)
    assert any(c.file == npz and c.item == "sha256" for c in plain.failures)

    _rehash(copy, npz)
    forged = verify_bundle(copy, model_root=workdir, spot_check=6)
    files = {c.file for c in forged.failures}
    assert SHARD in files  # the confusion matrix re-derived from the tampered cache is not the bundled one
    assert any(f.startswith("results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv") for f in files)
    [maps] = [c for c in forged.sections["Spot check"] if c.file == npz and c.item.startswith("post-softmax")]
    assert not maps.passed and maps.difference > 0.01
    assert "values outside" in maps.note


@pytest.mark.slow
def test_a_cache_from_another_model_fails_by_its_key_and_when_rekeyed_by_the_spot_check(toy_bundle, tmp_path):
    workdir, bundle = toy_bundle
    copy = _tampered_copy(bundle, tmp_path)
    swapped = []
    for source in sorted((copy / "files" / CONTROL_CACHE).glob("*.npz")):
        shutil.copyfile(source, copy / "files" / CACHE / source.name)
        swapped.append(f"{CACHE}/{source.name}")
    _rehash(copy, *swapped)
    keyed = verify_bundle(copy, model_root=workdir)
    key_failures = [c for c in keyed.sections["Attention caches"] if not c.passed]
    assert {c.file for c in key_failures} == set(swapped)
    assert all("model_fingerprint" in c.note and "toy_sd3_random" in c.note for c in key_failures)

    # A forger who also rewrites each file's key passes that check; re-extraction does not.
    expected_key = read_cached_image(bundle / "files" / CACHE, "toy_val_00000").key
    for path in swapped:
        entry = read_cached_image(copy / "files" / CACHE, Path(path).stem)
        entry.key = expected_key
        write_cached_image(copy / "files" / CACHE, entry)
    _rehash(copy, *swapped)
    rekeyed = verify_bundle(copy, model_root=workdir, spot_check=2)
    assert all(c.passed for c in rekeyed.sections["Attention caches"])
    spot = [c for c in rekeyed.sections["Spot check"] if c.file.startswith(CACHE + "/")]
    assert spot and any(not c.passed for c in spot), _failure_text(rekeyed)


@pytest.mark.slow
def test_a_cache_from_another_seed_fails_naming_the_seed(toy_bundle, tmp_path):
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention

    workdir, bundle = toy_bundle
    copy = _tampered_copy(bundle, tmp_path)
    manifest = json.loads((bundle / "files" / CACHE / "manifest.json").read_text())
    other = ExtractionSettings.from_dict({**manifest["settings"], "seed": 1, "source": str(workdir / "models/toy_sd3")})
    extract_attention(other, workdir / "data/prepared/toy_world_objects", tmp_path / "seed1", image_ids=["toy_val_00001"])
    shutil.copyfile(tmp_path / "seed1/toy_val_00001.npz", copy / "files" / CACHE / "toy_val_00001.npz")
    npz = f"{CACHE}/toy_val_00001.npz"
    _rehash(copy, npz)
    verification = verify_bundle(copy, model_root=workdir)
    [failure] = [c for c in verification.sections["Attention caches"] if not c.passed]
    assert failure.file == npz and "seed: file 1, manifest 0" in failure.note


@pytest.mark.slow
def test_a_missing_file_fails_naming_it_and_the_command_line_exits_non_zero(toy_bundle, tmp_path):
    workdir, bundle = toy_bundle
    copy = _tampered_copy(bundle, tmp_path)
    (copy / "files" / SHARD).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "seg4diff_repro.cli", "verify", str(copy), "--markdown", str(tmp_path / "report.md")],
        cwd=workdir, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].startswith("FAIL") and SHARD in result.stdout
    assert f"{SHARD}: file: bundled" in result.stderr
    report = (tmp_path / "report.md").read_text()
    assert f"| {SHARD} | file |" in report and "missing" in report


def test_bundle_records_are_read_from_snakemakes_metadata_layout(tmp_path):
    """Snakemake names a record by the urlsafe base64 of the output, split into '@'-prefixed folders when long."""
    output = "paper_tables/" + "x" * 300 + ".csv"
    encoded = base64.urlsafe_b64encode(output.encode()).decode()
    parts = [encoded[i : i + 254] for i in range(0, len(encoded), 254)]
    record = tmp_path / ".snakemake/metadata" / Path(*["@" + p for p in parts[:-1]], parts[-1])
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({
        "rule": "per_layer_table", "record_format_version": 6, "input": ["a.csv"], "incomplete": False,
        "shellcmd": "seg4diff-repro per-layer-table --scores a.csv --paper-model 'sd3 medium' --csv o.csv 2> log.txt",
    }))
    [(path, job)] = read_jobs(tmp_path).items()
    assert path == output and job.command == "per-layer-table" and job.inputs == ["a.csv"]
    assert job.argv() == ["per-layer-table", "--scores", "a.csv", "--paper-model", "sd3 medium", "--csv", "o.csv"]


def test_a_variants_model_fingerprint_is_compared_before_its_adapter_hash(tmp_path):
    bundled, rederived = tmp_path / "b.csv", tmp_path / "r.csv"
    pd.DataFrame({"mIoU": [50.0, 40.0], "model_fingerprint": ["sha256:m+lora:sha256:1", "sha256:m"]}).to_csv(
        bundled, index=False)
    pd.DataFrame({"mIoU": [50.0, 40.0], "model_fingerprint": ["sha256:m+lora:sha256:2", "sha256:n"]}).to_csv(
        rederived, index=False)
    checks = [c for c in compare_csv("paper_tables/t.csv", bundled, rederived) if c.item.endswith("model_fingerprint")]
    assert [c.passed for c in checks] == [True, False]  # the adapter's hash records its commit; the base model's not


def test_table_numbers_compare_within_the_printed_resolution_and_integers_exactly(tmp_path):
    bundled, rederived = tmp_path / "b.csv", tmp_path / "r.csv"
    pd.DataFrame({"layer": [0, 1], "mIoU": [50.61, 20.00], "paper_mIoU": [55.0, None],
                  "code_version": ["a", "a"], "lora_fingerprint": ["sha256:1", "sha256:1"]}).to_csv(bundled, index=False)
    pd.DataFrame({"layer": [0, 2], "mIoU": [50.60, 20.02], "paper_mIoU": [55.0, None],
                  "code_version": ["b", "b"], "lora_fingerprint": ["sha256:2", "sha256:2"]}).to_csv(rederived, index=False)
    checks = {c.item: c for c in compare_csv("paper_tables/t.csv", bundled, rederived)}
    assert checks["row 1 (layer=0), mIoU"].passed  # 0.01: one unit of the printed last digit
    assert checks["row 1 (layer=0), mIoU"].paper == 55.0
    assert checks["row 1 (layer=0), mIoU"].difference == pytest.approx(-0.01)
    assert not checks["row 2 (layer=1), mIoU"].passed  # 0.02 > TABLE_ABS_TOL
    assert TABLE_ABS_TOL == 0.01
    assert not checks["row 2 (layer=1), layer"].passed  # integers: exact
    assert checks["row 1 (layer=0), code_version"].passed  # the code that made it: listed, not compared
    # An adapter trained at another commit: its folder's hash differs (adapter.json records the commit).
    assert checks["row 1 (layer=0), lora_fingerprint"].passed
    assert checks["row 1 (layer=0), lora_fingerprint"].tolerance == "not compared"
    # A raw score CSV (full precision) is held to float noise, not to the printed resolution.
    raw = {c.item: c for c in compare_csv("results/segmentation/x.csv", bundled, rederived)}
    assert not raw["row 1 (layer=0), mIoU"].passed


def test_scoring_shards_compare_every_count_exactly(tmp_path):
    matrix = np.arange(16, dtype=np.int64).reshape(4, 4)
    np.savez(tmp_path / "b.npz", matrix=matrix, ignore_index=np.int64(255))
    changed = matrix.copy()
    changed[1, 2] += 1
    np.savez(tmp_path / "r.npz", matrix=changed, ignore_index=np.int64(255))
    checks = {c.item.split(" ")[0]: c for c in compare_npz("s.npz", tmp_path / "b.npz", tmp_path / "r.npz")}
    assert not checks["matrix"].passed and checks["matrix"].note == "1 cells differ"
    assert checks["matrix"].bundled == int(matrix.sum()) and checks["matrix"].rederived == int(matrix.sum()) + 1
    assert checks["ignore_index"].passed


def test_streamed_head_scores_are_rederived_from_their_shards(tmp_path):
    """Two shards of one layer's [heads=2] stack; head 1's merged matrix [[3, 1], [0, 4]] by hand: pACC = 7/8,
    mACC = (3/4 + 4/4)/2, mIoU = (3/4 + 4/5)/2."""
    from seg4diff_repro.segmentation.metrics import ConfusionMatrixStack
    from seg4diff_repro.verify.compare import check_head_scores

    shards = tmp_path / "per_head.shards"
    for number, head1 in enumerate(([[2, 1], [0, 1]], [[1, 0], [0, 3]])):
        stack = ConfusionMatrixStack(2, 2)
        stack._counts[0] = [[1, 0], [0, 1]]
        stack._counts[1] = head1
        (shards / f"shard_{number:05d}").mkdir(parents=True)
        stack.save(shards / f"shard_{number:05d}/layer_000.npz")
    scores = tmp_path / "per_head.csv"
    rows = [{"layer": 0, "head": 0, "pACC": 100.0, "mACC": 100.0, "mIoU": 100.0},
            {"layer": 0, "head": 1, "pACC": 87.5, "mACC": 87.5, "mIoU": 77.5}]
    pd.DataFrame(rows).to_csv(scores, index=False)
    assert all(c.passed for c in check_head_scores("per_head.csv", scores, shards))
    rows[1]["mIoU"] = 77.6
    pd.DataFrame(rows).to_csv(scores, index=False)
    [failure] = [c for c in check_head_scores("per_head.csv", scores, shards) if not c.passed]
    assert failure.item == "layer 0, head 1, mIoU" and failure.rederived == pytest.approx(77.5)
