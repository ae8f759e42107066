"""Every command in the README works as written: each `snakemake` command (in bash blocks and inline code) as a
dry run in a copy of the workflow, the scripts as CI and the toy-run tests run them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Shell commands of the README: the lines of ```bash blocks (continuations joined, comments dropped) and
    inline code that starts with `snakemake ` or `bash scripts/`, split at `;`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    inline = re.findall(r"`([^`]+)`", prose.replace("\n", " "))
    for span in inline:
        for part in span.split(";"):
            part = " ".join(part.split())
            if part.startswith(("snakemake ", "bash scripts/")):
                commands.append(shlex.join(shlex.split(part)))
    return list(dict.fromkeys(commands))


SNAKEMAKE_COMMANDS = [c for c in readme_commands() if c.startswith("snakemake ")]


def test_the_readme_has_the_commands_this_module_checks():
    commands = readme_commands()
    assert "bash scripts/run_toy.sh" in commands and "bash scripts/test.sh" in commands
    assert len(SNAKEMAKE_COMMANDS) >= 10, SNAKEMAKE_COMMANDS
    assert all(c.startswith(("snakemake ", "bash scripts/", "source ")) for c in commands), commands


def test_the_scripts_are_what_ci_and_the_toy_run_tests_run():
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()
    run_toy = (REPO / "scripts/run_toy.sh").read_text()
    # The toy-run tests (tests/test_workflow.py) run these two on a smaller toy world.
    assert re.findall(r"^snakemake .*$", run_toy, flags=re.MULTILINE) == [
        'snakemake --cores "${CORES:-2}" "$@"', "snakemake --cores 1 --report report.html"]


def test_no_target_follows_an_option_that_takes_several_values():
    """--configfile and --config take every following word: a target after them is read as a config file
    (a UnicodeDecodeError on a PDF) or as a config entry."""
    for command in SNAKEMAKE_COMMANDS:
        words = shlex.split(command)[1:]
        for option in ("--configfile", "--config"):
            if option in words:
                rest = words[words.index(option) + 1:]
                following = rest[: next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest))]
                if option == "--configfile":
                    assert all(w.endswith((".yaml", ".yml", ".json")) for w in following), command
                else:
                    assert all("=" in w for w in following), command


# Options of the README's commands and how many words follow them ("+": up to the next option).
ARITY = {"-n": 0, "--lint": 0, "--cores": 1, "--report": 1, "--resources": "+", "--configfile": "+", "--config": "+",
         "--forcerun": "+", "--sdm": "+", "--unlock": 0, "--forceall": 0, "--set-scatter": "+", "--workflow-profile": 1}


def split_command(command: str) -> tuple[list[str], list[str]]:
    """(targets, options) of a `snakemake` command."""
    words, targets, options = shlex.split(command)[1:], [], []
    while words:
        word = words.pop(0)
        if not word.startswith("-"):
            targets.append(word)
            continue
        assert word in ARITY, f"{command}: teach tests/test_readme.py the option {word}"
        arity = ARITY[word]
        count = arity if arity != "+" else next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
        options += [word, *words[:count]]
        del words[:count]
    return targets, options


def command_groups() -> dict[tuple[str, ...], list[str]]:
    """The README's snakemake commands grouped by their options (--cores and -n aside), so that one dry run with
    all of a group's targets checks them together: the dry runs are slow (each builds the DAG)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for command in SNAKEMAKE_COMMANDS:
        _, options = split_command(command)
        key = []
        while options:
            word = options.pop(0)
            count = ARITY[word] if ARITY[word] != "+" else next(
                (i for i, w in enumerate(options) if w.startswith("-")), len(options))
            values, options = options[:count], options[count:]
            if word not in ("-n", "--cores"):
                key += [word, *values]
        groups.setdefault(tuple(key), []).append(command)
    return groups


GROUPS = command_groups()


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "workflow", "envs", "models", "config.yaml", "configs", "profiles"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, workdir / name)
    return workdir


@pytest.mark.parametrize("options", list(GROUPS), ids=[" | ".join(commands) for commands in GROUPS.values()])
def test_the_readme_snakemake_commands_dry_run(workflow_copy, options):
    """Each group of commands as one dry run: their targets first, then the options they share."""
    commands = GROUPS[options]
    if "--report" in options:
        pytest.skip("a report needs built outputs: tests/test_workflow.py builds them and runs this command")
    if "--sdm" in options and not (shutil.which("conda") or shutil.which("mamba")):
        pytest.skip("conda is not installed here; the README's Environments section says what is tested instead")
    if "profiles/slurm" in options:
        pytest.importorskip("snakemake_executor_plugin_slurm", reason="the SLURM profile needs the executor plugin")
    # A command without targets builds the default target, `all`.
    targets = list(dict.fromkeys(t for command in commands for t in (split_command(command)[0] or ["all"])))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", *targets, *options], cwd=workflow_copy,
                            env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{commands}\n{output[-5000:]}"
    if "--lint" in options:
        assert "Congratulations, your workflow is in a good condition!" in output
        return
    if "--unlock" in options:  # unlocking plans no jobs
        assert "Unlocked working directory." in output, output[-2000:]
        return
    assert "Job stats:" in output or "Nothing to be done" in output, output[-2000:]
    if "all_run" in targets:
        # The single-model example builds that model's analyses (its t = 8 cache, from a sweep job where the
        # timestep sweep covers the pair) and nothing of the toy world.
        assert re.search(r"results/attention/sd3_medium/voc20/(sweep/)?t8/manifest\.json", output)
        # (The run-info job's command line quotes the whole config, toy models included.)
        jobs = "\n".join(line for line in output.splitlines() if "run-info" not in line)
        assert "toy_" not in jobs, "the single-model example plans toy-world jobs"
