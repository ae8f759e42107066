"""The workflow through a real SLURM cluster with the SLURM executor plugin and profiles/slurm, on a small toy
target: each non-local job is a SLURM job (checked in sacct, by the rule names the plugin writes into the job
comments), the tables stay local, the extraction runs as two shards. CI starts a one-node cluster on the test
machine first (scripts/setup_slurm.sh); without one the test skips, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from test_workflow import copy_workflow, edit_config, snakemake

SETUP_STATUS = Path(os.environ.get("SLURM_SETUP_STATUS", "/tmp/seg4diff_slurm_setup.txt"))
TARGET = "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv"


def cluster_or_skip() -> None:
    setup = SETUP_STATUS.read_text().strip() if SETUP_STATUS.is_file() else "scripts/setup_slurm.sh was not run"
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        pytest.skip(f"no SLURM client commands (sinfo, sacct) on this machine; {setup}")
    state = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True, text=True)
    if state.returncode != 0 or not {"idle", "mix", "alloc"} & set(state.stdout.split()):
        pytest.skip(f"no usable SLURM partition 'cpu' (sinfo: {state.stdout.strip() or state.stderr.strip()}); {setup}")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')")


def sacct_jobs(workdir: Path, since: str) -> pd.DataFrame:
    result = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-S", since, "-o", "JobID,State,Partition,Account,WorkDir,Comment"],
        capture_output=True, text=True, check=True,
    )
    rows = [line.split("|", 5) for line in result.stdout.splitlines() if line.strip()]
    jobs = pd.DataFrame(rows, columns=["job", "state", "partition", "account", "workdir", "comment"])
    return jobs[jobs["workdir"].map(lambda d: Path(d).resolve() == workdir.resolve())]


@pytest.mark.slow
def test_toy_target_runs_as_slurm_jobs_with_the_slurm_profile(tmp_path):
    cluster_or_skip()
    workdir = copy_workflow(tmp_path, attention={"layers": [0, 1]})
    edit_config(workdir, "toy_world", n_val=4)
    edit_config(workdir, "analyses", timestep_sweep={"timesteps": []})  # t = 8 in a job of its own
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    env = {**os.environ, "SEG4DIFF_SLURM_ACCOUNT": "ci", "SEG4DIFF_SLURM_PARTITION": "cpu",
           "SEG4DIFF_SLURM_GPU_CPUS": "1"}
    result = snakemake(
        workdir, TARGET, "--workflow-profile", "profiles/slurm", "--set-scatter", "extraction=2",
        "--slurm-init-seconds-before-status-checks", "5", "--jobs", "4", env=env,
    )
    scores = pd.read_csv(workdir / TARGET)
    assert scores["layer"].tolist() == [0, 1] and scores["mIoU"].between(0, 100).all()

    jobs = sacct_jobs(workdir, since)
    rules = sorted(comment.split("_wildcards_")[0].removeprefix("rule_") for comment in jobs["comment"])
    # One SLURM job per remote Snakemake job, the two extraction shards included; local rules (the gather, the
    # table) ran in the Snakemake process itself.
    assert rules == ["extract_attention_shard", "extract_attention_shard", "prepare_toy_world", "score_layers"], (
        jobs.to_string() + result.stderr[-3000:]
    )
    assert set(jobs["state"]) == {"COMPLETED"} and set(jobs["partition"]) == {"cpu"}
    assert set(jobs["account"]) == {"ci"}
    shards = sorted(c.rsplit("_", 1)[1] for c in jobs["comment"] if "extract_attention_shard" in c)
    assert shards == ["1-of-2", "2-of-2"]
    manifest = pd.read_json(workdir / "results/attention/toy_sd3/toy_objects/t8/manifest.json", typ="series")
    assert [shard["images"] for shard in manifest["shards"]] == [2, 2]
    assert all(shard["slurm_job_id"] in set(jobs["job"]) for shard in manifest["shards"])
