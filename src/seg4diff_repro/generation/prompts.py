"""The appendix's prompt lists: the 50 DrawBench analysis prompts (Fig. 1) and the prompts of the figure captions.

Both files are package data (``seg4diff_repro/data/prompts``), copied verbatim from the appendix text,
typos and punctuation included (e.g. Fig. 18's "A yellow colored giraffe" has no full stop).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

__all__ = ["DRAWBENCH50", "FIGURE_PROMPT_KEYS", "figure_prompts", "load_prompts"]

DRAWBENCH50 = "drawbench50.txt"
FIGURE_PROMPT_KEYS = ("fig03", "fig12", "fig13_14", "fig16", "fig17", "fig18", "fig19", "fig20")


def _packaged(name: str) -> str:
    return files("seg4diff_repro.data").joinpath("prompts").joinpath(name).read_text(encoding="utf-8")


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts of a text file, one per non-empty line (default: the packaged DrawBench 50), the first ``limit``."""
    text = _packaged(DRAWBENCH50) if path is None else Path(path).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts if limit is None else prompts[:limit]


def figure_prompts(key: str) -> list[str]:
    """The prompts of one appendix figure caption, e.g. ``figure_prompts("fig18")`` (Fig. 17's is [""])."""
    prompts = json.loads(_packaged("figure_prompts.json"))
    if key not in prompts:
        raise KeyError(f"no prompts for {key!r}; known figures: {sorted(prompts)}")
    return prompts[key]
