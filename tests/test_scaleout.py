"""Scaling out: extraction in image shards (scatter/gather), operational knobs that re-run nothing, the profiles,
and model downloads as jobs of their own. The GPU slots are tested in test_gpu_slots.py, SLURM in test_slurm.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from test_workflow import REPO, copy_workflow, edit_config, planned_jobs, snakemake, write_config

TARGET = "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv"
CACHE = "results/attention/toy_sd3/toy_objects/t8"


def job_counts(dry_run: subprocess.CompletedProcess) -> dict[str, int]:
    table = dry_run.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)}


def plan(workdir, *args: str) -> dict[str, int]:
    result = snakemake(workdir, "-n", TARGET, *args)
    return {} if "Nothing to be done" in result.stdout + result.stderr else job_counts(result)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One cache extracted as two shards (two jobs) and scored, with the workflow profile in place."""
    workdir = copy_workflow(tmp_path_factory.mktemp("sharded"), attention={"layers": [0, 1]})
    edit_config(workdir, "toy_world", n_val=6)
    edit_config(workdir, "analyses", timestep_sweep={"timesteps": []})  # t = 8 in a job of its own
    snakemake(workdir, TARGET, "--set-scatter", "extraction=2")
    return workdir


@pytest.mark.slow
def test_device_and_batch_size_are_recorded_but_plan_no_forward_pass(sharded):
    manifest = yaml.safe_load((sharded / CACHE / "manifest.json").read_text())
    assert [(s["shard"], s["images"], s["device"], s["batch_size"]) for s in manifest["shards"]] == [
        ([1, 2], 3, "cpu", 8), ([2, 2], 3, "cpu", 8)]
    assert plan(sharded, "--set-scatter", "extraction=2") == {}
    config = yaml.safe_load((sharded / "config.yaml").read_text())
    config["attention"]["batch_size"] = 1
    config["models"]["toy_sd3"]["device"] = "cuda"
    write_config(sharded, config)
    assert plan(sharded, "--set-scatter", "extraction=2") == {}
    edit_config(sharded, "attention", seed=1)  # what the maps are: every forward pass again
    assert plan(sharded, "--set-scatter", "extraction=2") == {
        "extract_attention_shard": 2, "extract_attention": 1, "score_layers": 1}
    config["attention"].update(batch_size=8, seed=0)
    config["models"]["toy_sd3"]["device"] = "cpu"
    write_config(sharded, config)
    assert plan(sharded, "--set-scatter", "extraction=2") == {}


@pytest.mark.slow
def test_a_killed_shard_reruns_alone_and_keeps_its_finished_images(sharded):
    shard = sharded / CACHE / "shards/2-of-2.json"
    lost = yaml.safe_load(shard.read_text())["caches"][0]["image_ids"][1]
    shard.unlink()  # the job was killed before writing its record ...
    (sharded / CACHE / f"{lost}.npz").unlink()  # ... and before caching its second image,
    for later in (CACHE + "/manifest.json", TARGET):  # so the jobs after it never ran
        (sharded / later).unlink()
    assert plan(sharded, "--set-scatter", "extraction=2") == {
        "extract_attention_shard": 1, "extract_attention": 1, "score_layers": 1}
    snakemake(sharded, TARGET, "--set-scatter", "extraction=2")
    log = (sharded / "logs/extract_attention/toy_sd3_toy_objects_t8_2-of-2.log").read_text()
    assert "shard 2 of 2: 1 of 3 images to extract" in log
    assert (sharded / CACHE / f"{lost}.npz").is_file()


def test_readme_commands_work_with_the_workflow_profile(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "prepare_voc21", cores=None, check=False)  # as the README writes it
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using workflow specific profile profiles/default" in result.stderr
    assert "prepare_voc21" in planned_jobs(result)
    result = snakemake(workdir, "-n", "results/attention/toy_sd3/toy_objects/t8/manifest.json", cores=None, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seg4diff-repro extract-attention --settings" in result.stdout  # the shard job's command is printed


def test_model_downloads_are_jobs_before_the_forward_passes_and_shards_follow_set_scatter(tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    target = "results/attention/sd3_medium/voc20/t8/manifest.json"
    dry_run = snakemake(workdir, "-n", target, "--set-scatter", "extraction=3",
                        "--configfile", "config.yaml", "configs/paper.yaml")
    counts = job_counts(dry_run)
    assert counts["download_model"] == 1 and counts["extract_attention_shard"] == 3
    # Every shard job waits for the model's download job: edges of the job graph.
    dag = snakemake(workdir, target, "--dag", "dot", "--set-scatter", "extraction=3",
                    "--configfile", "config.yaml", "configs/paper.yaml").stdout
    rules = {node: label for node, label in re.findall(r'^\s*(\d+)\[label = "(\w+)', dag, flags=re.MULTILINE)}
    edges = re.findall(r"^\s*(\d+) -> (\d+)$", dag, flags=re.MULTILINE)
    shards = {node for node, rule in rules.items() if rule == "extract_attention_shard"}
    after_download = {child for parent, child in edges if rules[parent] == "download_model"}
    assert len(shards) == 3 and shards <= after_download
    assert "extract-attention" not in (workdir / "workflow/rules/models.smk").read_text()


def test_slurm_profile_puts_gpu_rules_on_the_gpu_partition(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm is not installed")
    workdir = copy_workflow(tmp_path)
    edit_config(workdir, "analyses", timestep_sweep={"timesteps": []})  # t = 8 in a job of its own
    # A dry run prints a rule's message instead of its details (resources among them): this copy drops the messages.
    for rules in (workdir / "workflow/rules").glob("*.smk"):
        rules.write_text(re.sub(r"^    message:\n(?:        .*\n)+?(?=    \w+:)", "", rules.read_text(), flags=re.MULTILINE))
    env = {**os.environ, "SEG4DIFF_SLURM_ACCOUNT": "acct", "SEG4DIFF_SLURM_PARTITION": "cpuq",
           "SEG4DIFF_SLURM_GPU_PARTITION": "gpuq"}
    result = snakemake(workdir, "-n", "--workflow-profile", "profiles/slurm", TARGET, cores=None, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"rule (\w+):\n(?:\s+\w+: .+\n)*?\s+resources: (.+)", result.stdout)
    resources = {}
    for rule, line in jobs:
        resources.setdefault(rule, []).append(dict(item.split("=", 1) for item in line.split(", ")))
    assert len(resources["extract_attention_shard"]) == 4  # the profile's four image shards
    for shard in resources["extract_attention_shard"]:
        assert (shard["slurm_partition"], shard["slurm_account"], shard["runtime"]) == ("gpuq", "acct", "15")
    assert resources["score_layers"][0]["slurm_partition"] == "cpuq"
