"""The fault drill as tests: bad configs and damaged inputs fail naming the key or file, Snakemake's recovery
commands run, preparation steps re-run, and a run killed (SIGKILL) during extraction, scoring or a figure job
completes on the re-run with the results of an uninterrupted run, recomputing only what was missing.

Damaged cache files, images and labels are covered next to their readers (test_attention_cache.py,
test_layout.py), killed scoring shards in test_scoring_shards.py, bad configs at DAG build in test_workflow.py.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from seg4diff_repro.config import ConfigError, check_config, check_device, looks_like_local_path
from seg4diff_repro.datasets.toy_world import generate_toy_world
from seg4diff_repro.models.common import ModelLoadError, load_pipeline
from test_workflow import BIN, REPO, copy_workflow, edit_config, planned_jobs, snakemake

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


# --- the config check -------------------------------------------------------------------------------


def toy_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def run_model(config: dict, source: str) -> dict:
    """``config`` with a model ``mine`` of that source added to the run."""
    config["models"]["mine"] = {"backbone": "sd3", "source": source}
    config["run"]["models"].append("mine")
    return config


def set_key(config: dict, dotted_key: str, value) -> dict:
    *parents, last = dotted_key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: set_key(c, "analyses.timestep_sweep.timesteps", [1, 40]),
         r"analyses\.timestep_sweep\.timesteps contains \[40\].*model 'toy_sd3'.*allowed 1\.\.28"),
        (lambda c: set_key(c, "analyses.attention_figures.timesteps", [8, 29]),
         r"analyses\.attention_figures\.timesteps contains \[29\].*allowed 1\.\.28"),
        (lambda c: set_key(c, "analyses.attention_figures.map_timestep", 30),
         r"analyses\.attention_figures\.map_timestep = 30 is out of range for model 'toy_sd3'"),
        (lambda c: set_key(c, "analyses.attention_figures.head_map_layers", [11, 12]),
         r"analyses\.attention_figures\.head_map_layers contains \[12\].*allowed 0\.\.11"),
        (lambda c: set_key(c, "models.toy_sd3.device", "gpu"), r"models\.toy_sd3\.device = 'gpu' is not a torch device"),
        (lambda c: set_key(c, "toy_model.device", "gpu"), r"toy_model\.device = 'gpu' is not a torch device.*or auto"),
        (lambda c: set_key(c, "analyses.generation.fidelity.device", "cuda:x"),
         r"analyses\.generation\.fidelity\.device = 'cuda:x' is not a torch device"),
        (lambda c: set_key(c, "verification.device", "gpu"), r"verification\.device = 'gpu' is not a torch device.*or auto"),
        (lambda c: run_model(c, "./nowhere/sd3"), r"models\.mine\.source = './nowhere/sd3' is a local path.*does not exist"),
        (lambda c: run_model(c, "models/sd3_copy"), r"models\.mine\.source = 'models/sd3_copy' is a local path"),
        (lambda c: run_model(c, "~/nowhere_seg4diff/sd3"), r"models\.mine\.source = '~/nowhere_seg4diff/sd3'"),
        (lambda c: set_key(c, "data.paths.voc21", "/nowhere/VOCdevkit"),
         r"data\.paths\.voc21 = '/nowhere/VOCdevkit' is not a folder"),
        (lambda c: set_key(c, "analyses.generation.prompts_file", "prompts_missing.txt"),
         r"analyses\.generation\.prompts_file = 'prompts_missing\.txt' is not a file"),
        (lambda c: set_key(set_key(c, "analyses.generation.fidelity.weights", "pretrained"),
                           "analyses.generation.fidelity.dino_source", "./dino_missing"),
         r"analyses\.generation\.fidelity\.dino_source = './dino_missing' is a local path and not a folder"),
        (lambda c: set_key(set_key(c, "analyses.generation.fidelity.weights", "pretrained"),
                           "analyses.generation.fidelity.clip_pretrained", "clip_missing.pt"),
         r"analyses\.generation\.fidelity\.clip_pretrained = 'clip_missing\.pt' is a path but not a file"),
    ],
)
def test_bad_value_fails_the_config_check_naming_the_key(edit, expected):
    config = toy_config()
    check_config(copy.deepcopy(config), SCHEMA)  # the default passes
    with pytest.raises(ConfigError, match=expected):
        check_config(edit(config), SCHEMA)


JOB_DEVICE_TYPES = {"cpu", "cuda", "mps"}  # where the jobs place work (other torch device types are refused)


@pytest.mark.parametrize("value", [
    "cpu", "cuda", "cuda:0", "cuda:1", "cuda:10", "mps", "mps:0", "cpu:0", "gpu", "GPU", "CUDA", "Cuda", "cuda:x",
    "cuda1", "cuda:01", "cuda:-1", "cuda: 1", " cuda", "cuda ", "cuda:", "cuda:1:2", "cuda:1.0", "cuda:\uff11", "",
    "xpu", "meta", "auto",
])
def test_the_device_check_accepts_what_torch_accepts_on_the_job_device_types(value):
    """The config check reads device strings without torch (the Snakefile parses without it); torch.device is the
    reference: a string passes exactly when torch parses it to a cpu, cuda or mps device, or is `auto` where
    allowed."""
    import torch

    try:
        torch_accepts = torch.device(value).type in JOB_DEVICE_TYPES
    except RuntimeError:
        torch_accepts = False
    for allow_auto in (False, True):
        try:
            check_device(value, "some.device", allow_auto=allow_auto)
            accepted = True
        except ConfigError as error:
            assert str(error).startswith(f"some.device = {value!r} is not a torch device"), error
            accepted = False
        assert accepted == (torch_accepts or (allow_auto and value == "auto")), (value, allow_auto)


def test_layer_counts_are_those_of_the_models_the_build_command_writes(tmp_path):
    """The config check counts each tiny model's joint layers (all blocks; Flux: double- then single-stream) and
    the layers the generation analyses perturb (Flux: the double-stream ones) before the model is built, from its
    sizes and not from diffusers, and again from the built folder. The reference: the blocks of the transformer
    that the build command (as the rule build_tiny_model runs it) writes, loaded with diffusers."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from seg4diff_repro.cli import main
    from seg4diff_repro.config import model_num_layers, perturbable_layer_count

    models = {name: model for name, model in toy_config()["models"].items() if "build" in model}
    assert {(model["backbone"], model["build"].get("variant", "sd3")) for model in models.values()} == {
        ("sd3", "toy_world"), ("sd3", "sd35"), ("flux", "sd3")}
    for name, model in models.items():
        folder = tmp_path / name
        main(["build-tiny-model", "--backbone", model["backbone"], "--variant", model["build"].get("variant", "sd3"),
              "--out", str(folder), "--seed", "0"])
        if model["backbone"] == "flux":
            transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
            blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
            perturbable = len(transformer.transformer_blocks)
        else:
            blocks = perturbable = len(SD3Transformer2DModel.from_pretrained(folder / "transformer").transformer_blocks)
        for source in (tmp_path / "not_built", folder):
            counted = {**model, "source": str(source)}
            assert (model_num_layers(counted), perturbable_layer_count(counted)) == (blocks, perturbable), (name, source)


def test_a_key_left_to_its_default_is_checked_at_the_default():
    config = toy_config()
    del config["models"]["toy_sd3"]["num_inference_steps"]  # default 28: a bare KeyError before
    check_config(copy.deepcopy(config), SCHEMA)
    config["attention"]["timestep"] = 29
    with pytest.raises(ConfigError, match=r"attention\.timestep = 29 is out of range for model 'toy_sd3': allowed 1\.\.28"):
        check_config(config, SCHEMA)


def test_a_local_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"models.mine.source = '{tmp_path}/model' has no model_index.json")):
        check_config(run_model(toy_config(), f"{tmp_path}/model"), SCHEMA)


@pytest.mark.parametrize(
    ("source", "local"),
    [
        ("/models/sd3", True), ("./sd3", True), ("../sd3", True), ("~/sd3", True), ("sd3", True),
        ("models/toy_sd3", True), ("results/models/toy_sd3_random", True), ("a/b/c", True),
        ("stabilityai/stable-diffusion-3-medium-diffusers", False), ("black-forest-labs/FLUX.1-dev", False),
        ("facebook/dino-vits16", False),
    ],
)
def test_local_paths_are_told_from_hub_ids(source, local):
    assert looks_like_local_path(source) is local


class NoHubPipeline:
    """Fails the test if the loader asks for the source (which, for a missing folder, means the hub)."""

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        raise AssertionError(f"from_pretrained({source!r}) called: the hub would have been contacted")


@pytest.mark.parametrize("source", ["models/not_there", "results/models/not_there"])
def test_a_missing_local_source_is_not_sent_to_the_hub(source):
    with pytest.raises(ModelLoadError, match=rf"{source} does not exist and is not a Hugging Face id"):
        load_pipeline(NoHubPipeline, source)


# --- the workflow: recovery commands, re-runs, kills --------------------------------------------------


def isolated_env(home: Path) -> dict[str, str]:
    """The environment with an empty home folder and none of the cache variables set: the defaults at work."""
    cache_variables = ("XDG_CACHE_HOME", "MPLCONFIGDIR", "HF_HOME", "TORCH_HOME", "HF_TOKEN_PATH", "HF_HUB_CACHE")
    home.mkdir(exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if k not in cache_variables}, "HOME": str(home)}


def small_world(workdir: Path, n_val: int = 4) -> Path:
    workdir.mkdir()
    copy_workflow(workdir)
    edit_config(workdir, "toy_world", n_train=1, n_val=n_val)
    edit_config(workdir, "attention", batch_size=1, layers=[0, 3])
    # No timestep sweep: the t = 8 cache is then its own extraction job's (results/attention/<model>/<dataset>/t8).
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["analyses"]["timestep_sweep"]["timesteps"] = []
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.mark.slow
def test_recovery_commands_and_forced_preparation_work_as_the_readme_writes_them(tmp_path):
    workdir, env = small_world(tmp_path / "work"), isolated_env(tmp_path / "home")
    manifest = "data/prepared/toy_world_objects/manifest.json"
    snakemake(workdir, manifest, cores=None, env=env)  # no --cores: the workflow profile's default
    for command in (["--unlock"], ["--cleanup-metadata", manifest], ["--summary"]):
        result = snakemake(workdir, *command, cores=None, env=env, check=False)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    # Without the profile too, which gives the cores: a `threads: workflow.cores` rule fails these with "Workflow
    # requires a total number of cores". (Without the profile Snakemake keeps its source cache under the home folder.)
    for command in (["--unlock"], ["--summary"]):
        result = snakemake(workdir, "--workflow-profile", "none", *command, cores=None,
                           env=isolated_env(tmp_path / "home_without_profile"), check=False)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    # Snakemake deletes manifest.json before it re-runs the rule; the generator then replaces its own folder.
    snakemake(workdir, "data/prepared/toy_world_objects/manifest.json", "--forcerun", "prepare_toy_world", cores=None, env=env)
    reference = tmp_path / "reference"
    generate_toy_world(reference / "seed0", preset="objects", n_train=1, n_val=4, image_size=64, seed=0)
    assert files_of(workdir / "data/prepared/toy_world_objects") == files_of(reference / "seed0")
    # A changed toy_world key re-runs the rule too.
    edit_config(workdir, "toy_world", seed=1)
    assert planned_jobs(snakemake(workdir, "-n", manifest, env=env)) == {"prepare_toy_world"}
    snakemake(workdir, manifest, env=env)
    generate_toy_world(reference / "seed1", preset="objects", n_train=1, n_val=4, image_size=64, seed=1)
    assert files_of(workdir / "data/prepared/toy_world_objects") == files_of(reference / "seed1")
    assert not list((workdir / "data/prepared").glob(".*"))  # no staging folder left
    assert not list((tmp_path / "home").iterdir())  # nothing written under the home folder


@pytest.mark.slow
def test_new_weights_in_a_local_model_folder_replan_what_read_them(tmp_path):
    """A model folder that no rule builds (a save_pretrained folder) is read through its files: new weights at the
    same path make `snakemake -n` plan the extraction, which then recomputes every image (its key holds the
    folder's content fingerprint). Before, the jobs had no input in the folder and the old cache stayed."""
    from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

    workdir = small_world(tmp_path / "work")
    write_tiny_sd3_pipeline(workdir / "localmodels/mine", seed=0)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    run_model(config, "localmodels/mine")
    config["models"]["mine"] = {k: v for k, v in config["models"]["toy_sd3_random"].items() if k != "build"} | {
        "source": "localmodels/mine", "analysis_layer": 0}  # the default tiny pipeline has fewer blocks than the control
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/attention/mine/toy_objects/t8/manifest.json"
    log = workdir / "logs/extract_attention/mine_toy_objects_t8_1-of-1.log"
    snakemake(workdir, target)
    assert "4 of 4 images to extract" in log.read_text()
    nothing = snakemake(workdir, "-n", target)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

    # New transformer weights only: model_index.json and every config stay as they were.
    weights = "transformer/diffusion_pytorch_model.safetensors"
    write_tiny_sd3_pipeline(tmp_path / "retrained", seed=1)
    assert (tmp_path / "retrained" / weights).read_bytes() != (workdir / "localmodels/mine" / weights).read_bytes()
    shutil.copyfile(tmp_path / "retrained" / weights, workdir / "localmodels/mine" / weights)
    assert planned_jobs(snakemake(workdir, "-n", target)) == {"extract_attention_shard", "extract_attention"}
    snakemake(workdir, target)
    assert "4 of 4 images to extract" in log.read_text()


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TARGET = "figures/toy/per_layer_toy_sd3_toy_objects_t8.png"
CACHE = "results/attention/toy_sd3/toy_objects/t8"
N_VAL = 12


def run_until(workdir: Path, env: dict[str, str], pattern: str) -> None:
    """Run Snakemake on TARGET and SIGKILL it (with its jobs: one process group) once ``pattern`` matches a path."""
    env = {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(workdir / "killed_run.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", TARGET], cwd=workdir, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not list(workdir.glob(pattern)):
            assert process.poll() is None, f"the run ended before {pattern} appeared"
            assert time.monotonic() < deadline, f"{pattern} did not appear in 600 s"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stamps(workdir: Path, *patterns: str) -> dict[str, int]:
    """Modification times of the files matching ``patterns``: unchanged means not recomputed."""
    return {p.relative_to(workdir).as_posix(): p.stat().st_mtime_ns
            for pattern in patterns for p in workdir.glob(pattern) if p.is_file()}


def leftovers(workdir: Path) -> list[str]:
    """Temp and staging files and folders of killed writers."""
    return [p.relative_to(workdir).as_posix() for folder in ("data", "results", "paper_tables", "figures")
            for p in (workdir / folder).rglob(".*") if re.search(r"\.(tmp|partial|old|staging)$", p.name)]


@pytest.mark.slow
def test_runs_killed_in_extraction_scoring_and_a_figure_finish_on_rerun_with_identical_results(tmp_path):
    env = isolated_env(tmp_path / "home")
    reference = small_world(tmp_path / "reference", n_val=N_VAL)
    snakemake(reference, TARGET, env=env)
    workdir = small_world(tmp_path / "killed", n_val=N_VAL)

    # 1. Killed during extraction, once its first images are cached. Each kill leaves Snakemake's lock behind,
    # which --unlock removes (README, "After a crash").
    run_until(workdir, env, f"{CACHE}/*.npz")
    done = stamps(workdir, f"{CACHE}/*.npz")
    assert 1 <= len(done) < N_VAL and not (workdir / CACHE / "manifest.json").exists()
    snakemake(workdir, "--unlock", cores=None, env=env)

    # 2. Killed during scoring: the re-run extracted only the images that were missing.
    run_until(workdir, env, "logs/score_layers/toy_sd3_toy_objects_t8.log")
    log = (workdir / "logs/extract_attention/toy_sd3_toy_objects_t8_1-of-1.log").read_text()  # the shard's
    assert f"{N_VAL - len(done)} of {N_VAL} images to extract" in log
    assert {name: stamp for name, stamp in stamps(workdir, f"{CACHE}/*.npz").items() if name in done} == done
    extracted = stamps(workdir, f"{CACHE}/*")
    assert len(extracted) == N_VAL + 1  # and the manifest
    snakemake(workdir, "--unlock", cores=None, env=env)

    # 3. Killed in the figure job: the re-run scored without extracting again, and the last run only draws.
    run_until(workdir, env, "logs/per_layer_figure/toy_sd3_toy_objects_t8.log")
    assert stamps(workdir, f"{CACHE}/*") == extracted
    scored = stamps(workdir, "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv", "paper_tables/toy/*")
    assert len(scored) == 3
    snakemake(workdir, "--unlock", cores=None, env=env)
    snakemake(workdir, TARGET, env=env)
    assert stamps(workdir, "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv", "paper_tables/toy/*") == scored

    # The same results as the uninterrupted run, nothing half-written left, nothing under the home folder.
    for name in sorted(p.name for p in (reference / CACHE).glob("*.npz")):
        with np.load(reference / CACHE / name) as expected, np.load(workdir / CACHE / name) as got:
            assert expected.files == got.files
            for field in expected.files:
                np.testing.assert_array_equal(got[field], expected[field], err_msg=f"{name}: {field}")
    for output in ("results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv",
                   "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv", "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.md",
                   TARGET):
        assert (workdir / output).read_bytes() == (reference / output).read_bytes(), output
    assert leftovers(workdir) == []
    assert not list((tmp_path / "home").iterdir())
    assert (workdir / ".cache/matplotlib").is_dir()  # the figure job's matplotlib cache, inside the project


@pytest.mark.slow
def test_the_command_a_damaged_cache_file_names_recomputes_that_image_and_nothing_else(toy_run, tmp_path):
    """The rebuild command in a damaged-cache message, run exactly as printed, recomputes that image only. The
    message used to force <cache>/manifest.json, the gather job's output: the gather only re-checked the file and
    failed again. On a copy of the toy run, at the t = 8 cache that toy_sd3's timestep sweep writes."""
    workdir = tmp_path / "run"
    shutil.copytree(toy_run, workdir, symlinks=True)
    sweep = "results/attention/toy_sd3/toy_objects/sweep"
    damaged = sorted((workdir / sweep / "t8").glob("*.npz"))[1]
    with np.load(damaged) as data:
        expected = {field: data[field] for field in data.files}
    kept = {name: stamp for name, stamp in stamps(workdir, f"{sweep}/t*/*.npz").items()
            if name != damaged.relative_to(workdir).as_posix()}
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # as a copy cut short by a full disk

    # Scoring reads it (its finished shards removed, so that it reads every image) and names the file and the command.
    scores = "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv"
    shutil.rmtree(workdir / "results/segmentation/toy_sd3/toy_objects/t8/per_layer.shards")
    assert snakemake(workdir, scores, "--forcerun", "score_layers", check=False).returncode != 0
    message = (workdir / "logs/score_layers/toy_sd3_toy_objects_t8.log").read_text()
    assert f"attention cache file {damaged.relative_to(workdir)} is damaged" in message
    command = shlex.split(re.search(r"`(snakemake [^`]*)`", message).group(1))
    assert command == ["snakemake", f"{sweep}/t8/manifest.json", "--forcerun", f"{sweep}/shards/1-of-1.json"]

    rebuilt = snakemake(workdir, *command[1:], cores=None)  # as printed: the profile gives the cores
    # The run's job table (a rule with a message prints the message, not "rule <name>:").
    table = (rebuilt.stdout + rebuilt.stderr).split("Job stats:")[1].split("total")[0]
    ran = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE))
    assert ran == {"extract_attention_sweep": "1", "extract_attention_sweep_shard": "1"}
    shard_log = (workdir / "logs/extract_attention_sweep/toy_sd3_toy_objects_1-of-1.log").read_text()
    todo = dict(re.findall(r"sweep/t(\d+) shard 1 of 1: (\d+) of 6 images to extract", shard_log))
    assert todo == {"1": "0", "4": "0", "8": "1", "14": "0", "20": "0", "28": "0"}
    assert stamps(workdir, *kept) == kept  # every other file of the six caches untouched
    # The same maps: the prompt, spans, seed and key exactly; the float maps up to float32 rounding, which depends on
    # the batch (the run extracted all six images in one batch, the repair this one alone).
    with np.load(damaged) as data:
        assert data.files == list(expected)
        for field, value in expected.items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(data[field], value, rtol=1e-2, atol=1e-5, err_msg=field)
            else:
                np.testing.assert_array_equal(data[field], value, err_msg=field)
    snakemake(workdir, scores)  # the run that failed now completes
