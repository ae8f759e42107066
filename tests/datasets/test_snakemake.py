"""workflow/rules/datasets.smk through Snakemake: dry run against the real URLs, lint, and one real run
(download from the local server + prepare) with the published Cityscapes val count of 500."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from ds_support import cityscapes_zips, sha256

from seg4diff_repro.datasets import read_manifest

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "workflow" / "rules"


def _harness(tmp_path: Path, data: dict) -> Path:
    """A minimal Snakefile including datasets.smk (and toy.smk, for prepare_all's toy-world inputs)."""
    rel = Path(os.path.relpath(RULES, tmp_path))
    toy = (
        f'DATA_ROOT = Path(config["data"]["root"])\ninclude: "{rel / "toy.smk"}"\n'
        if (RULES / "toy.smk").is_file()
        else 'rule prepare_toy_world:\n    output: "data/prepared/toy_world_{preset}/manifest.json"\n'
        '    log: "logs/toy_{preset}.log"\n    shell: "touch {output}"\n'
    )
    (tmp_path / "Snakefile").write_text(
        f'configfile: "config.yaml"\n\ninclude: "{rel / "datasets.smk"}"\n{toy}'
    )
    config = {"data": data, "toy_world": {"n_train": 2, "n_val": 2, "image_size": 32, "seed": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--directory", str(workdir), "--snakefile", str(workdir / "Snakefile"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir,
    )


def test_dry_run_prepare_all_lists_the_expected_jobs(tmp_path):
    wd = _harness(tmp_path, {"root": "data", "paths": {}})
    run = _snakemake(wd, "-n", "-p", "prepare_all")
    assert run.returncode == 0, run.stderr + run.stdout
    out = run.stdout + run.stderr
    counts = {
        "download_dataset_archive": 9,  # val2017.zip is shared by coco_object and coco_stuff27
        "prepare_voc21": 1, "prepare_coco_object": 1, "prepare_pc59": 1, "prepare_ade150": 1,
        "prepare_coco_stuff27": 1, "prepare_cityscapes": 1, "prepare_toy_world": 4, "prepare_all": 1,
    }
    for job, n in counts.items():
        assert any(line.split() == [job, str(n)] for line in out.splitlines()), (job, out[-2000:])
    assert "seg4diff-repro download --archive voc2012_trainval --dest data/downloads/VOCtrainval_11-May-2012.tar" in out
    assert "seg4diff-repro prepare-dataset --name pc59 --out data/prepared/pc59 --downloads-dir data/downloads" in out


def test_existing_copy_needs_no_download_and_voc20_is_an_alias(tmp_path):
    wd = _harness(tmp_path, {"root": "data", "paths": {"voc21": "/datasets/my voc"}})
    run = _snakemake(wd, "-n", "-p", "prepare_voc20")
    assert run.returncode == 0, run.stderr + run.stdout
    out = run.stdout + run.stderr
    assert "download_dataset_archive" not in out
    assert "--source-dir '/datasets/my voc'" in out and "prepare_voc20" in out


def test_rules_pass_lint(tmp_path):
    wd = _harness(tmp_path, {"root": "data", "paths": {}})
    run = _snakemake(wd, "--lint")
    out = run.stdout + run.stderr
    assert "datasets.smk" not in out, out


def _entry_point_dir(tmp_path: Path) -> Path:
    """Use the real `seg4diff-repro` if cli.py already registers the dataset commands, else a shim."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    try:
        from seg4diff_repro.cli import build_parser

        build_parser().parse_args(["download", "--archive", "voc2012_trainval", "--dest", "x"])
        real = Path(sys.executable).parent / "seg4diff-repro"
        if real.is_file():
            (bin_dir / "seg4diff-repro").symlink_to(real)
            return bin_dir
    except (ImportError, SystemExit, AttributeError):
        pass
    shim = bin_dir / "seg4diff-repro"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom seg4diff_repro.cli_datasets import main\nmain(sys.argv[1:])\n")
    shim.chmod(0o755)
    return bin_dir


def test_real_run_downloads_and_prepares_cityscapes_with_the_published_count(server, tmp_path):
    files = cityscapes_zips(n=500)
    overrides = {}
    for key, name in [("cityscapes_gtfine_trainvaltest", "gtFine_trainvaltest.zip"),
                      ("cityscapes_leftimg8bit_trainvaltest", "leftImg8bit_trainvaltest.zip")]:
        overrides[key] = {"url": server.add(name, files[name]), "checksum": ":".join(sha256(files[name]))}
    (tmp_path / "wf").mkdir()
    wd = _harness(tmp_path / "wf", {"root": "data", "paths": {}, "source_overrides": overrides})
    env = dict(os.environ, PATH=f"{_entry_point_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    run = _snakemake(wd, "--cores", "2", "prepare_cityscapes", env=env, timeout=180)
    logs = "".join(p.read_text() for p in (wd / "logs" / "datasets").glob("*.log")) if (wd / "logs").exists() else ""
    assert run.returncode == 0, run.stderr[-3000:] + logs[-3000:]
    manifest = read_manifest(wd / "data" / "prepared" / "cityscapes")
    assert manifest["splits"] == {"val": 500} and manifest["extra"]["expected_count"] == 500
    assert len(server.gets("gtFine_trainvaltest.zip")) == 1
    assert (wd / "results" / "benchmarks" / "datasets" / "prepare_cityscapes.tsv").is_file()
    # Nothing is fetched again: a second run has nothing to do.
    again = _snakemake(wd, "--cores", "1", "prepare_cityscapes", env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert len(server.gets("leftImg8bit_trainvaltest.zip")) == 1
