"""envs/*.yaml (for `snakemake --sdm conda`): third-party packages only, with pyproject.toml's ranges, resolvable
on the package index; every rule names one of them, and the dataset rules' commands need nothing the dataset env
lacks. (conda itself is not exercised here: see the README's "Environments".)"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {normalise(Requirement(r).name): Requirement(r) for r in project["dependencies"]}


def pip_entries(path: Path) -> list[str]:
    env = yaml.safe_load(path.read_text())
    return next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)


def env_requirements(path: Path) -> dict[str, Requirement]:
    return {normalise(Requirement(r).name): Requirement(r) for r in pip_entries(path) if not r.startswith("-")}


def test_env_files_install_only_named_packages_from_the_index():
    """Snakemake builds a conda env from a copy of its file under .snakemake/conda/: a local path such as
    `-e ..` would point there, not at the checkout. Every pip entry must be a plain requirement."""
    for path in ENVS:
        env = yaml.safe_load(path.read_text())
        for entry in pip_entries(path):
            try:
                requirement = Requirement(entry)
            except InvalidRequirement:
                pytest.fail(f"{path.name}: pip entry {entry!r} is not a requirement (options and paths are not allowed)")
            assert requirement.url is None, f"{path.name}: {entry!r} installs from a URL or path"
        for entry in env["dependencies"]:
            if isinstance(entry, str):
                assert "/" not in entry and not entry.startswith("."), f"{path.name}: {entry!r} looks like a path"


def test_each_env_pins_the_same_ranges_as_pyproject():
    project = pyproject_requirements()
    for path in sorted((REPO / "envs").glob("*.yaml")):
        for name, requirement in env_requirements(path).items():
            assert name in project, f"{path.name} lists {name}, which pyproject.toml does not depend on"
            assert requirement.specifier == project[name].specifier, (
                f"{path.name}: {requirement} differs from pyproject.toml's {project[name]}"
            )


def test_envs_together_cover_pyproject():
    covered = set()
    for path in (REPO / "envs").glob("*.yaml"):
        covered |= set(env_requirements(path))
    missing = set(pyproject_requirements()) - covered - {"snakemake"}  # snakemake runs the envs, not in them
    assert not missing, f"no env in envs/ installs {sorted(missing)}"


def test_every_rule_that_runs_code_uses_an_existing_env():
    for rules in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = rules.read_text()
        envs = re.findall(r'conda:\s*\n\s*"([^"]+)"', text)
        commands = re.findall(r"^    (?:shell|script|run):", text, flags=re.MULTILINE)
        assert len(envs) == len(commands), f"{rules.name}: {len(commands)} rules run code, {len(envs)} name an env"
        for env in envs:
            assert (rules.parent / env).resolve().is_file(), f"{rules.name}: {env} does not exist"


def _import_names(distribution: str) -> set[str]:
    """Top-level modules that an installed distribution provides."""
    provided = importlib.metadata.packages_distributions()
    return {module for module, dists in provided.items() if normalise(distribution) in map(normalise, dists)}


def test_rules_of_the_datasets_env_run_their_commands_with_only_what_it_installs(tmp_path):
    """The commands of the rules that name envs/datasets.yaml (downloads, preparation, report pages), through
    workflow/bin/seg4diff-repro as the jobs run them, with every package that env does not install unimportable."""
    missing = set(pyproject_requirements()) - set(env_requirements(REPO / "envs/datasets.yaml"))
    blocked = sorted(set().union(*(_import_names(name) for name in missing)))
    assert {"torch", "diffusers", "pandas"} <= set(blocked)
    env = blocker_site(tmp_path, blocked, "is not in envs/datasets.yaml")
    commands = sorted(set().union(*(
        re.findall(r"seg4diff-repro ([a-z-]+)", rule)
        for path in sorted((REPO / "workflow/rules").glob("*.smk"))
        for rule in re.split(r"^rule ", path.read_text(), flags=re.MULTILINE)
        if "envs/datasets.yaml" in rule
    )))
    assert {"download", "prepare-dataset"} <= set(commands)
    for command in commands:
        result = subprocess.run(
            [str(REPO / "workflow/bin/seg4diff-repro"), command, "--help"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: seg4diff-repro {command}" in result.stdout
    # The modules those commands import lazily, too.
    check = ("import seg4diff_repro.datasets.download, seg4diff_repro.datasets.prepare, seg4diff_repro.progress, "
             "seg4diff_repro.tables.html, seg4diff_repro.provenance, seg4diff_repro.atomic")
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # And the blocker does block (so that the checks above could fail).
    result = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "not in envs/datasets.yaml" in result.stderr


def blocker_site(folder: Path, blocked: list[str], reason: str) -> dict[str, str]:
    """A sitecustomize in ``folder`` that makes the ``blocked`` top-level modules unimportable (ImportError with
    ``reason``), and the environment that runs Python with it and with this checkout's src/ on PYTHONPATH."""
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        f"            raise ImportError(f'{{name}} {reason}')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(folder), str(REPO / "src")]),
    }


def test_the_snakefile_parses_without_the_model_libraries(tmp_path):
    """Building the DAG (a dry run of the default config) needs neither torch nor diffusers nor transformers: a
    host with Snakemake (the login node, `--sdm conda`) parses the workflow; only the jobs import them. The copy
    has no built model folder, so the tiny models' layer counts must come from somewhere other than diffusers."""
    from test_workflow import copy_workflow

    env = blocker_site(tmp_path, ["torch", "diffusers", "transformers"], "is not needed to parse the Snakefile")
    (tmp_path / "workflow").mkdir()
    workdir = copy_workflow(tmp_path / "workflow")
    assert not (workdir / "results/models").exists()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "build_tiny_model" in result.stdout and "extract_attention" in result.stdout
    # And the blocker does block (so that the dry run could fail).
    result = subprocess.run([sys.executable, "-c", "import diffusers"], env=env, capture_output=True, text=True)
    assert "is not needed to parse the Snakefile" in result.stderr


_UNREACHABLE = ("Could not fetch URL", "Max retries exceeded", "NewConnectionError", "Temporary failure in name resolution",
                "Network is unreachable", "connection broken")


@pytest.mark.network
@pytest.mark.parametrize("env_file", [path.name for path in ENVS])
def test_pip_part_of_each_env_resolves_on_the_index(env_file, tmp_path):
    """What `--sdm conda` would ask pip for (the env's Python 3.11, Linux x86-64 wheels) resolves on the index,
    each package within the env's range. pip only resolves (--dry-run): nothing is downloaded beyond metadata."""
    path = REPO / "envs" / env_file
    env = yaml.safe_load(path.read_text())
    python = next(entry for entry in env["dependencies"] if isinstance(entry, str) and entry.startswith("python="))
    requirements = env_requirements(path)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(tmp_path / "report.json"), "--target", str(tmp_path / "t"),
         "--python-version", python.split("=")[1], "--only-binary=:all:",
         "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", *pip_entries(path)],
        capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0 and any(marker in result.stderr for marker in _UNREACHABLE):
        pytest.skip(f"the package index cannot be reached: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, f"{env_file} does not resolve:\n{result.stderr[-3000:]}"
    resolved = {normalise(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    for name, requirement in requirements.items():
        assert name in resolved, f"{env_file}: {name} was not resolved"
        assert requirement.specifier.contains(resolved[name], prereleases=True), (name, resolved[name])


def ci_versions() -> dict[str, str]:
    """name -> version of constraints/ci.txt, the one set of versions CI installs."""
    pins = {}
    for line in (REPO / "constraints/ci.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def test_every_range_admits_the_version_ci_tests():
    pins = ci_versions()
    requirements = list(pyproject_requirements().values())
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for requirement in requirements + [Requirement(r) for r in test_extra]:
        name = normalise(requirement.name)
        assert name in pins, f"constraints/ci.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{requirement} excludes the tested {name}=={pins[name]}"


@pytest.mark.parametrize("name", ["diffusers", "transformers"])
def test_diffusers_and_transformers_are_held_to_the_minor_release_ci_tests(name):
    """The attention processors copy diffusers' op for op, and CI tests one version of each: no other minor."""
    major, minor, *_ = (int(part) for part in ci_versions()[name].split("."))
    specifier = pyproject_requirements()[name].specifier
    assert not specifier.contains(f"{major}.{minor + 1}.0")
    assert not specifier.contains(f"{major}.{minor - 1}.0")
    assert not specifier.contains(f"{major + 1}.0.0")
