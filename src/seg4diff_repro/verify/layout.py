"""Where things live, for the bundle and its verification: output folders, bundle layout, command classes.

Every path rule of the verification room is here, so that a change of the pipeline's output layout (e.g.
``figures/<namespace>/``) is one edit.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# Top-level folders of the pipeline's final outputs (the lead will add a namespace level below them).
TABLE_ROOTS = ("paper_tables",)
FIGURE_ROOTS = ("figures",)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

# Inside a bundle folder.
BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FILES = "files"  # the run's files under their paths relative to the workflow directory
BUNDLE_CONFIG = "config.yaml"
BUNDLE_ENVIRONMENT = "environment.txt"  # pip-freeze style lock of the Python environment
BUNDLE_FORMAT = 1

# How verification treats the job of each `seg4diff-repro <command>`:
# re-derived on a CPU from the bundled files with the current code (tables, figures, scoring from caches),
REDERIVED_COMMANDS = frozenset({
    "score-layers", "score-unsupervised", "per-layer-table", "per-layer-figure", "toy-world-summary",
    "timestep-sweep", "normalisation-table", "unsupervised-table", "head-figure", "timestep-panels",
    "normalisation-panels", "appendix-per-layer", "overlays", "main-table", "fidelity-figure", "generation-grid",
    "value-norm-heads-figure", "value-norm-layers-figure", "magnet-grid", "clipscore-table",
})
# GPU work (forward passes, generation, backbone scoring): its outputs are bundled and are the inputs of the
# re-derivation; attention caches among them are spot-checked by re-extraction,
GPU_COMMANDS = frozenset({
    "extract-attention", "gather-attention", "score-heads", "generate-run", "score-fidelity", "value-norms",
    "pca-qkv-figure", "token-maps-figure", "toy-generations", "score-clipscore",
})
# and the sources (models, datasets), recorded by content fingerprint rather than bundled file by file.
SOURCE_COMMANDS = frozenset({
    "make-toy-shapes", "make-toy-world", "prepare-dataset", "download", "download-model", "build-tiny-model",
    "train-toy-model",
})
# Commands whose output manifest.json stands for the folder of per-image cache files beside it: the gathering
# of an extraction's image shards (the shards' own outputs are small records of the jobs).
CACHE_COMMANDS = frozenset({"gather-attention"})
# Commands that keep resumable scoring shards in <out without suffix>.shards/ beside their CSV.
SHARDED_COMMANDS = frozenset({"score-layers", "score-unsupervised", "score-heads"})

COMMAND = re.compile(r"seg4diff-repro ([a-z][a-z0-9-]*)")


def command_of(shellcmd: str) -> str | None:
    """The `seg4diff-repro` subcommand a rule's shell command runs, or None for other commands."""
    match = COMMAND.search(shellcmd or "")
    return match.group(1) if match else None


def _top(path: str) -> str:
    parts = PurePosixPath(path).parts
    return parts[0] if parts else ""


def is_table(path: str) -> bool:
    """A table's numbers (its CSV); the Markdown beside it renders the same numbers."""
    return _top(path) in TABLE_ROOTS and path.endswith(".csv")


def in_tables(path: str) -> bool:
    return _top(path) in TABLE_ROOTS


def is_figure(path: str) -> bool:
    return _top(path) in FIGURE_ROOTS and path.endswith(FIGURE_SUFFIXES)


def shard_folder(output: str) -> str:
    """The shard folder a sharded scoring command keeps beside its CSV ``output`` (see `cli._shard_root`)."""
    return str(PurePosixPath(output).with_suffix(".shards"))


def check_relative(path: str, what: str) -> str:
    """``path`` if it is relative and stays inside its root; a bundle never writes outside the scratch folder."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{what} {path!r} is absolute or leaves its folder: bundles hold relative paths only")
    return path
