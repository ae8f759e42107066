"""Code fingerprints and git state: a change to a stage's code changes its fingerprint, other changes do not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import seg4diff_repro
from seg4diff_repro.provenance import STAGE_MODULES, code_fingerprint, provenance_label, source_files

PACKAGE = Path(seg4diff_repro.__file__).parent

REPORT = """
import json
from seg4diff_repro.provenance import STAGE_MODULES, code_fingerprint, git_state
print(json.dumps({"stages": {s: code_fingerprint(s) for s in STAGE_MODULES}, "git": git_state()}))
"""


def fingerprints_of(src: Path) -> dict:
    """Fingerprints and git state computed by a fresh interpreter importing the package under ``src``."""
    result = subprocess.run(
        [sys.executable, "-c", REPORT], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "seg4diff_repro", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_extraction_closure_follows_imports_and_leaves_out_tables_and_figures():
    names = {p.relative_to(PACKAGE).as_posix() for p in source_files(STAGE_MODULES["extraction"])}
    assert {"attention/extract.py", "attention/recorder.py", "models/sd3.py", "datasets/layout.py",
            "segmentation/prompts.py", "__init__.py"} <= names
    assert not any(name.startswith(("tables/", "figures/", "generation/")) for name in names)
    assert "segmentation/score.py" not in names
    scoring = {p.relative_to(PACKAGE).as_posix() for p in source_files(STAGE_MODULES["scoring"])}
    assert names < scoring and "segmentation/metrics.py" in scoring


def test_a_change_in_a_stage_changes_its_fingerprint_and_only_the_stages_that_run_it(package_copy: Path):
    before = fingerprints_of(package_copy)["stages"]
    assert before == {stage: code_fingerprint(stage) for stage in STAGE_MODULES}  # same source, same prints

    recorder = package_copy / "seg4diff_repro/attention/recorder.py"
    recorder.write_text(recorder.read_text() + "\n# a change to the recorder\n")
    after_recorder = fingerprints_of(package_copy)["stages"]
    for stage in ("extraction", "scoring", "generation", "package"):
        assert after_recorder[stage] != before[stage], stage
    assert after_recorder["datasets"] == before["datasets"]

    table_code = next((package_copy / "seg4diff_repro/tables").glob("*.py"))
    table_code.write_text(table_code.read_text() + "\n# a change to a table\n")
    after_table = fingerprints_of(package_copy)["stages"]
    assert after_table["package"] != after_recorder["package"]
    for stage in ("datasets", "extraction", "scoring", "generation"):
        assert after_table[stage] == after_recorder[stage], stage


def test_git_state_names_the_commit_and_flags_changed_source(package_copy: Path):
    assert fingerprints_of(package_copy)["git"] == {"commit": None, "dirty": None}  # not a checkout
    repo = package_copy.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD").strip()
    assert fingerprints_of(package_copy)["git"] == {"commit": head, "dirty": False}
    (repo / "outputs.csv").write_text("a pipeline output outside the package\n")
    assert fingerprints_of(package_copy)["git"]["dirty"] is False
    extract = package_copy / "seg4diff_repro/attention/extract.py"
    extract.write_text(extract.read_text() + "\n# uncommitted\n")
    assert fingerprints_of(package_copy)["git"] == {"commit": head, "dirty": True}


def test_label_names_version_fingerprint_and_commit():
    record = {"package_version": "0.1.0", "code_fingerprint": "ab" * 8, "commit": "c" * 40, "dirty": True}
    assert provenance_label(record) == f"0.1.0, code {'ab' * 8}, commit {'c' * 10} (dirty)"
    assert provenance_label({**record, "dirty": False}).endswith(f"commit {'c' * 10}")
    assert provenance_label({**record, "commit": None}).endswith("no git commit")
