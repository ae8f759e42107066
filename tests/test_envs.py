"""envs/*.yaml (for `snakemake --sdm conda`) agree with pyproject.toml, and every rule names one of them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {normalise(Requirement(r).name): Requirement(r) for r in project["dependencies"]}


def env_requirements(path: Path) -> dict[str, Requirement]:
    env = yaml.safe_load(path.read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    return {normalise(Requirement(r).name): Requirement(r) for r in pip if not r.startswith("-")}


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
