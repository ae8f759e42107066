"""Which code made a result: the package version, a fingerprint of the source that computed it, the commit.

A stage's fingerprint hashes the source files its entry module reaches through ``seg4diff_repro``
imports (found by reading the files, without importing anything, so the Snakefile can use it without
torch), plus the package data (class lists, prompts, paper numbers). Caches and scoring shards are
keyed by it, so a change to the code a stage runs recomputes that stage and nothing else, while a
change elsewhere (a figure, a table layout) leaves the forward passes alone. The git commit and
whether the package's source differs from it (the dirty flag) are recorded beside the fingerprint in
every manifest and table; they are not part of the keys, since a new commit that leaves a stage's
code unchanged computes the same numbers.
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
from functools import lru_cache
from pathlib import Path

from seg4diff_repro import __version__

PACKAGE = "seg4diff_repro"
PACKAGE_DIR = Path(__file__).resolve().parent
LAZY_IMPORT = re.compile(r"seg4diff_repro(\.[a-z_0-9]+)+")

# Entry modules of the stages whose results are cached; everything else (tables, figures, the command
# line) is cheap and keyed by the whole package.
STAGE_MODULES = {
    "datasets": (
        "seg4diff_repro.datasets.prepare", "seg4diff_repro.datasets.toy_shapes", "seg4diff_repro.datasets.toy_world",
    ),
    "extraction": ("seg4diff_repro.attention.extract",),
    "scoring": (
        "seg4diff_repro.segmentation.score",
        "seg4diff_repro.segmentation.heads",
        "seg4diff_repro.segmentation.unsupervised",
    ),
    "generation": ("seg4diff_repro.generation.runs", "seg4diff_repro.generation.sampling"),
    "models": ("seg4diff_repro.models.tiny", "seg4diff_repro.models.tiny_flux"),
    "magnet": ("seg4diff_repro.magnet.train",),
    "package": ("seg4diff_repro.cli",),
}

# The stage of each command-line command whose results a code change must recompute. Commands not listed
# run the whole package (tables, figures: cheap), except those in UNKEYED_COMMANDS.
COMMAND_STAGES = {
    "make-toy-shapes": "datasets",
    "make-toy-world": "datasets",
    "prepare-dataset": "datasets",
    "build-tiny-model": "models",
    "extract-attention": "extraction",
    "gather-attention": "extraction",  # joins the shards into the manifest the scoring reads
    "score-layers": "scoring",
    "score-unsupervised": "scoring",
    "score-heads": "scoring",
    "generate-run": "generation",
    "value-norms": "generation",
    "magnet-train": "magnet",
}
# Downloads are verified by checksum (models: by commit, in the caches' keys), and training the toy model is a GPU job that its own rule's
# settings and an explicit --forcerun decide: neither re-runs because the package changed.
UNKEYED_COMMANDS = ("download", "download-model", "train-toy-model")


def command_fingerprint(command: str) -> str | None:
    """The code fingerprint that decides when the rule running ``seg4diff-repro <command>`` re-runs."""
    if command in UNKEYED_COMMANDS:
        return None
    return code_fingerprint(COMMAND_STAGES.get(command, "package"))


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    candidates = [PACKAGE_DIR.joinpath(*parts, "__init__.py")]
    if parts:
        candidates.append(PACKAGE_DIR.joinpath(*parts[:-1], f"{parts[-1]}.py"))
    return next((path for path in candidates if path.is_file()), None)


def _imported_modules(path: Path) -> set[str]:
    """Package modules that ``path`` imports anywhere (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names.add(node.module)
            # `from seg4diff_repro.x import y` may name a submodule y
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (path.name == "__init__.py" and isinstance(node, ast.Constant) and isinstance(node.value, str)
              and LAZY_IMPORT.fullmatch(node.value)):
            names.add(node.value)  # a package's export imported on first use by name (import_module)
    return names


def source_files(entry_modules: tuple[str, ...]) -> list[Path]:
    """The package's source files reachable from ``entry_modules``, parents' ``__init__`` included."""
    seen: set[Path] = set()
    pending = list(entry_modules)
    while pending:
        name = pending.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for depth in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(_imported_modules(path))
    return sorted(seen)


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def code_fingerprint(stage: str) -> str:
    """16 hex digits identifying the source of ``stage`` (a key of ``STAGE_MODULES``) and the package data."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; known stages: {sorted(STAGE_MODULES)}")
    data = sorted(p for p in (PACKAGE_DIR / "data").rglob("*") if p.is_file())
    return _hash_files(source_files(STAGE_MODULES[stage]) + data)


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


@lru_cache(maxsize=None)
def git_state() -> dict:
    """The commit of the checkout the package runs from, and whether its source differs from it.

    ``commit`` is None for an installed copy outside git. ``dirty`` looks at the package's own source
    only, so pipeline outputs written into the same checkout during a run do not flip it.
    """
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", str(PACKAGE_DIR))
    return {"commit": commit, "dirty": bool(status)}


def provenance(stage: str = "package") -> dict:
    """What every manifest records: version, the stage's code fingerprint, the commit and the dirty flag."""
    return {"package_version": __version__, "code_fingerprint": code_fingerprint(stage), **git_state()}


def provenance_label(record: dict | None = None) -> str:
    """One line for table headers and figure captions, e.g. ``0.1.0, code 1a2b3c4d5e6f7a8b, commit e7fe2cb (dirty)``."""
    record = provenance() if record is None else record
    commit = record.get("commit")
    where = "no git commit" if not commit else f"commit {commit[:10]}" + (" (dirty)" if record.get("dirty") else "")
    return f"{record['package_version']}, code {record['code_fingerprint']}, {where}"
