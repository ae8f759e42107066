"""Figures for figures/<outputs>/ (seaborn, PNG and PDF), each with a provenance footer, and the wording every
figure shares: wrapped titles and step labels."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.provenance import provenance_label

# No time stamps or tool versions in the files, so that re-running an unchanged analysis gives identical bytes.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}
# Where a figure drawn from a model it loaded itself keeps that model's record (`models.common.model_record`),
# as JSON: a PNG text chunk, and the PDF's Subject.
MODEL_METADATA_KEY = {"png": "seg4diff model", "pdf": "Subject"}


def provenance_footer(png_path: Path) -> str:
    """The line under every figure: which outputs it belongs to (the folder under figures/) and which code made it."""
    folder = Path(png_path).parent
    outputs = f"{folder.name} outputs · " if folder.parent.name == "figures" else ""
    return f"{outputs}seg4diff-repro {provenance_label()}"


def save_figure(fig, png_path: Path, pdf_path: Path, model: Mapping[str, str | None] | None = None) -> None:
    """Write ``fig`` as PNG and PDF with the provenance footer, each atomically, then close it.

    ``model``: the record of the model the figure's job loaded (`models.common.model_record`): the footer
    cites its fingerprint and both files keep the whole record in their metadata (`MODEL_METADATA_KEY`).
    """
    import matplotlib.pyplot as plt

    # Below everything already drawn (labels can reach under the figure's edge); the tight bounding box
    # of the saved file grows to hold it, so it never covers a label.
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    x = (drawn.x0 + drawn.x1) / 2 / fig.get_figwidth()
    y = (drawn.y0 - 0.04) / fig.get_figheight()
    footer = provenance_footer(png_path)
    if model is not None:
        footer += f"\nmodel {model['model_fingerprint']}"
    fig.text(x, y, footer, ha="center", va="top", fontsize=6, color="0.35")
    for path, fmt in ((png_path, "png"), (pdf_path, "pdf")):
        metadata = dict(_METADATA[fmt])
        if model is not None:
            metadata[MODEL_METADATA_KEY[fmt]] = json.dumps(dict(model), sort_keys=True)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata, bbox_inches="tight", pad_inches=0.1)
        atomic_write_bytes(Path(path), buffer.getvalue())
    plt.close(fig)


def wrap_title(title: str, width_inches: float, fontsize: float) -> str:
    """``title`` broken at spaces into lines that fit ``width_inches`` at ``fontsize`` points in matplotlib's default
    font, measured glyph by glyph (its own line breaks kept; a single word longer than the width stays whole;
    never inside "name = value" nor before a number)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    font, measure = FontProperties(size=fontsize), TextToPath()
    limit = 72 * width_inches * 0.96  # points, with a margin for the renderer's hinting

    def fits(text: str) -> bool:
        return measure.get_text_width_height_descent(text, font, ismath=False)[0] <= limit

    lines = []
    for paragraph in title.split("\n"):
        line = ""
        # "t = 8 of 28", "σ = 0.515", "layer 9" stay on one line: "=" binds the words on either side of it, a
        # number the word before it, and "k of N" its three words.
        for word in re.sub(r" (?==|\d)|(?<==) |(?<=\d) (?=of \d)", "\u00a0", paragraph).split(" "):
            word = word.replace("\u00a0", " ")
            candidate = f"{line} {word}" if line else word
            if line and not fits(candidate):
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return "\n".join(lines)


def step_label(k: int, num_steps: int, index: int, sigma: float, paper_steps: int | None = None) -> str:
    """"t = 8 of 28: schedule index 20, σ = 0.515": the paper's t, where it sits in the schedule, and its noise.

    ``paper_steps``: the schedule length k counts on when it is not the model's own (the paper's "t = k of 28"
    placed on a ``num_steps`` schedule): "t = 28 of 28, on a 50-step schedule: schedule index 0, σ = 1.000".
    """
    if paper_steps is None or paper_steps == num_steps:
        return f"t = {k} of {num_steps}: schedule index {index}, σ = {sigma:.3f}"
    return f"t = {k} of {paper_steps}, on a {num_steps}-step schedule: schedule index {index}, σ = {sigma:.3f}"


def layer_axis(ax, layers: Sequence[int], first_single: int | None = None, label: str = "layer (0-based)") -> None:
    """A tick per layer (smaller labels past 30 layers: the caller gives ≥ 0.16 inch per layer) and, for Flux,
    its single-stream blocks shaded from ``first_single`` on behind a dashed line, both named in the axis label."""
    ax.set_xticks(list(layers))
    ax.tick_params(axis="x", labelsize=7 if len(layers) > 30 else 9)
    ax.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
    if first_single is None:
        ax.set_xlabel(label)
        return
    boundary = first_single - 0.5
    ax.axvspan(boundary, max(layers) + 0.6, color="0.92", zorder=0)
    ax.axvline(boundary, color="0.35", linestyle="--", linewidth=1)
    # Named in the axis label rather than over the plot, where it could hide a curve.
    ax.set_xlabel(f"{label}\ndouble-stream blocks {min(layers)}–{first_single - 1}, single-stream blocks "
                  f"{first_single}–{max(layers)} (shaded, after the dashed line)")
