"""Appendix Fig. 1: the 50 DrawBench analysis prompts, numbered in two columns as the appendix lists them."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from seg4diff_repro.figures import save_figure, wrap_title  # noqa: E402

__all__ = ["plot_prompt_list", "prompt_list_figure"]

WRAP = 72  # characters per line of a prompt: two columns fit an 11-inch-wide page at 7.5 pt
FONT_SIZE = 7.5
LINE_HEIGHT = FONT_SIZE * 1.2 / 72  # inches per line (matplotlib's default line spacing 1.2)
GAP = 0.06  # inches between two prompts


def _entry(number: int, prompt: str) -> str:
    """"12. Two dogs on the street.", wrapped, continuation lines indented under the text."""
    return textwrap.fill(f"{number}. {prompt}", WRAP, subsequent_indent="     ")


def prompt_list_figure(prompts: Sequence[str], title: str, footer: str = "") -> Figure:
    """The numbered prompts in two columns (1 … ⌈n/2⌉ left, the rest right), each prompt one text artist."""
    half = math.ceil(len(prompts) / 2)
    columns = [list(enumerate(prompts[:half], 1)), list(enumerate(prompts[half:], half + 1))]
    entries = [[_entry(number, prompt) for number, prompt in column] for column in columns]
    column_height = max(sum(LINE_HEIGHT * (entry.count("\n") + 1) + GAP for entry in column) for column in entries)
    width = 11.0
    title = wrap_title(title, width, 10)
    header = 0.35 + 0.18 * (title.count("\n") + 1)
    height = header + column_height + (0.4 if footer else 0.2)
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    for c, column in enumerate(entries):
        y = height - header
        for entry in column:
            fig.text(0.03 + 0.49 * c, y / height, entry, fontsize=FONT_SIZE, va="top", ha="left")
            y -= LINE_HEIGHT * (entry.count("\n") + 1) + GAP
    if footer:
        fig.text(0.5, 0.12 / height, wrap_title(footer, width, 7), fontsize=7, ha="center", va="bottom",
                 color="dimgray")
    return fig


def plot_prompt_list(prompts: Sequence[str], title: str, footer: str, png_path: Path, pdf_path: Path) -> None:
    save_figure(prompt_list_figure(prompts, title, footer), png_path, pdf_path)
