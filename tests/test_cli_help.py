"""`seg4diff-repro --help` explains itself: --version, a description for every command, help and defaults for
every option, and the keys of the JSON options, checked against the dataclasses that read them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seg4diff_repro.cli import build_parser
from seg4diff_repro.cli_help import COMMAND_GROUPS, SETTINGS_JSON

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The command line as a user runs it, importing this checkout's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "seg4diff_repro.cli", *args], capture_output=True, text=True,
                          env=env, check=False, timeout=120)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def squash(text: str) -> str:
    return " ".join(text.split())


def test_version_is_the_package_version():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"seg4diff-repro {version}\n"


def test_main_help_lists_every_command_by_group_with_its_description():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    commands = subcommands()
    assert len(commands) >= 30
    for name in commands:
        # "  name   one-line help"
        line = re.search(rf"^  {re.escape(name)} +(\S.*)$", result.stdout, re.MULTILINE)
        assert line, f"{name} is not listed with a description in --help"
        assert len(line.group(1).split()) >= 3, (name, line.group(1))
    grouped = [name for names in COMMAND_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(commands), (
        "cli_help.COMMAND_GROUPS must name each registered command once: "
        f"missing {sorted(set(commands) - set(grouped))}, unknown {sorted(set(grouped) - set(commands))}"
    )
    assert "Other:" not in result.stdout
    for title in COMMAND_GROUPS:
        assert f"\n{title}:\n" in result.stdout


def test_every_subcommand_has_a_description_and_its_help_runs(capsys):
    for name, command in subcommands().items():
        assert command.description and command.description.strip(), name
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: seg4diff-repro {name} "), name
        assert squash(command.description) in squash(out), name


def test_subcommand_help_runs_from_the_command_line():
    result = run_cli("score-unsupervised", "--help")
    assert result.returncode == 0, result.stderr
    assert "(default: 0.1)" in squash(result.stdout) and "(default: official)" in squash(result.stdout)


def test_every_option_has_help_and_shows_its_default():
    for name, command in subcommands().items():
        text = squash(command.format_help())
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help text"
            shows_default = f"(default: {action.default})" in text
            if action.required or action.default is None or action.nargs == 0:
                continue
            assert shows_default, f"{name} {action.option_strings[0]}: default {action.default!r} not shown"


def test_defaults_are_shown_once_and_not_for_required_options():
    help_text = squash(subcommands()["download"].format_help())
    assert help_text.count("(default: 5)") == 1  # --retries, whose own help no longer repeats it
    extract = squash(subcommands()["extract-attention"].format_help())
    assert "(default: 8)" in extract and "(default: cpu)" in extract
    assert "(default: None)" not in extract


def dataclass_keys(path: str) -> set[str]:
    module, name = path.rsplit(".", 1)
    return {field.name for field in dataclasses.fields(getattr(__import__(module, fromlist=[name]), name))}


@pytest.mark.parametrize(
    ("command", "dataclass"),
    [
        ("extract-attention", "seg4diff_repro.attention.extract.ExtractionSettings"),
        ("score-heads", "seg4diff_repro.attention.extract.ExtractionSettings"),
        ("score-layers", "seg4diff_repro.segmentation.score.ScoringSettings"),
        ("generate-run", "seg4diff_repro.generation.runs.GenerationRun"),
        ("score-fidelity", "seg4diff_repro.generation.fidelity.FidelitySettings"),
        ("score-clipscore", "seg4diff_repro.generation.clipscore.ClipScoreSettings"),
    ],
)
def test_documented_settings_keys_are_the_dataclass_fields(command, dataclass):
    option, _, _, keys = SETTINGS_JSON[command]
    assert set(keys) == dataclass_keys(dataclass)
    epilog = subcommands()[command].format_help()
    assert f"{option} is JSON" in epilog
    for key in keys:
        assert re.search(rf"^  {key} ", epilog, re.MULTILINE), (command, key)


def test_documented_model_settings_keys_are_those_the_commands_read():
    source = (REPO / "src/seg4diff_repro/cli_attention_figures.py").read_text()
    read = set(re.findall(r"settings(?:\[|\.get\()\"(\w+)\"", source))
    assert {"backbone", "source", "num_steps", "analysis_layer"} <= read  # the pattern works
    for command in ("value-norms", "pca-qkv-figure", "token-maps-figure"):
        option, _, _, keys = SETTINGS_JSON[command]
        assert option == "--model-settings"
        assert read <= set(keys), sorted(read - set(keys))
