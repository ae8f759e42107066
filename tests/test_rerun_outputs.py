"""A fresh run's tables against committed ones (`seg4diff-repro compare-outputs`): the unit behaviour here; the
committed toy-world tables against a fresh default run in tests/test_workflow.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from seg4diff_repro.verify.rerun import RERUN_TABLE_ABS_TOL, compare_table_folders

REPO = Path(__file__).resolve().parents[1]


def committed_copy(tmp_path: Path) -> tuple[Path, Path]:
    committed, fresh = tmp_path / "committed" / "toy", tmp_path / "fresh" / "toy"
    shutil.copytree(REPO / "paper_tables" / "toy", committed)
    shutil.copytree(REPO / "paper_tables" / "toy", fresh)
    return committed, fresh


def compare_outputs(committed: Path, fresh: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg4diff_repro.cli", "compare-outputs", "--committed",
                           str(committed), "--fresh", str(fresh), *extra], capture_output=True, text=True)


def test_identical_tables_pass_and_every_number_is_counted(tmp_path):
    committed, fresh = committed_copy(tmp_path)
    result = compare_outputs(committed, fresh, "--markdown", str(tmp_path / "report.md"))
    assert result.returncode == 0, result.stderr
    numbers = sum(pd.read_csv(path).select_dtypes(["number", "bool"]).notna().sum().sum()
                  for path in committed.glob("*.csv"))
    assert result.stdout.strip() == f"PASS: {numbers} numbers in {len(list(committed.glob('*.csv')))} tables reproduced (largest difference 0)"
    assert "| paper_tables/toy/tab01_normalisation.csv |" in (tmp_path / "report.md").read_text()


def test_a_cell_beyond_the_tolerance_fails_naming_table_row_and_column(tmp_path):
    committed, fresh = committed_copy(tmp_path)
    table = pd.read_csv(fresh / "per_layer_toy_sd3_toy_objects_t8.csv")
    table.loc[2, "mIoU"] += RERUN_TABLE_ABS_TOL  # within: one unit of the printed last digit
    table.loc[3, "mACC"] += 3 * RERUN_TABLE_ABS_TOL
    table.to_csv(fresh / "per_layer_toy_sd3_toy_objects_t8.csv", index=False)
    checks = {(c.file, c.item): c for c in compare_table_folders(committed, fresh)}
    name = "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv"
    assert checks[(name, "row 3 (model=toy_sd3, dataset=toy_objects, layer=2), mIoU")].passed
    failing = [c for c in checks.values() if not c.passed]
    assert [(c.file, c.item) for c in failing] == [(name, "row 4 (model=toy_sd3, dataset=toy_objects, layer=3), mACC")]
    result = compare_outputs(committed, fresh)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL: 1 of ") and "layer=3), mACC" in result.stdout


def test_a_table_missing_from_either_side_and_a_changed_integer_fail(tmp_path):
    committed, fresh = committed_copy(tmp_path)
    (fresh / "fig02_timestep.csv").unlink()
    shutil.copy(committed / "tab01_normalisation.csv", fresh / "tab99_new.csv")
    table = pd.read_csv(fresh / "fig11_per_layer_flux.csv")
    table.loc[0, "layer"] = 7
    table.to_csv(fresh / "fig11_per_layer_flux.csv", index=False)
    failing = {(c.file.rsplit("/", 1)[1], c.note) for c in compare_table_folders(committed, fresh) if not c.passed}
    assert ("fig02_timestep.csv", f"committed but not made by the fresh run in {fresh}") in failing
    assert ("tab99_new.csv", f"made by the fresh run but not committed under {committed}") in failing
    assert any(name == "fig11_per_layer_flux.csv" for name, _ in failing)
    assert len(failing) == 3
