"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_workflow import TEST_SD3_LAYER, copy_workflow, snakemake, write_config

# The toy world's generation analyses scaled down for the shared run: 2 prompts, 1 seed, one perturbed layer per
# fidelity figure and one grid layer (the default perturbs every layer: 31 generation jobs instead of 9).
TEST_GENERATION = {"n_prompts": 2, "seeds": [3], "grid_layers": [TEST_SD3_LAYER],
                   "fidelity_layers": {"sd3": [TEST_SD3_LAYER], "sd35": [1], "flux": [1]}}

# The toy MAGNET runs shortened for the shared run (the default trains 30 iterations each).
TEST_MAGNET_RECIPE = {"iterations": 6, "checkpoint_every": 3, "warmup_iterations": 2}


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """The whole default DAG (`snakemake` with no target) on a small toy world, run once for every module that
    checks its outputs: 6 validation images, the generation analyses of TEST_GENERATION and MAGNET's toy runs
    shortened to TEST_MAGNET_RECIPE. Tests that change
    its config put it back; a test that breaks something works on a copy."""
    workdir = copy_workflow(tmp_path_factory.mktemp("toy_run"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["analyses"]["generation"].update(TEST_GENERATION)
    for run in config["magnet"]["runs"].values():  # MAGNET's toy trainings: a few iterations, two checkpoints
        run["recipe"] = {**run["recipe"], **TEST_MAGNET_RECIPE}
    write_config(workdir, config)
    snakemake(workdir)
    return workdir
