"""Figures for figures/<outputs>/ (seaborn, PNG and PDF), each with a provenance footer."""

from __future__ import annotations

import io
from pathlib import Path

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.provenance import provenance_label

# No time stamps or tool versions in the files, so that re-running an unchanged analysis gives identical bytes.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def provenance_footer(png_path: Path) -> str:
    """The line under every figure: which outputs it belongs to (the folder under figures/) and which code made it."""
    folder = Path(png_path).parent
    outputs = f"{folder.name} outputs · " if folder.parent.name == "figures" else ""
    return f"{outputs}seg4diff-repro {provenance_label()}"


def save_figure(fig, png_path: Path, pdf_path: Path) -> None:
    """Write ``fig`` as PNG and PDF with the provenance footer, each atomically, then close it."""
    import matplotlib.pyplot as plt

    # Below everything already drawn (labels can reach under the figure's edge); the tight bounding box
    # of the saved file grows to hold it, so it never covers a label.
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    x = (drawn.x0 + drawn.x1) / 2 / fig.get_figwidth()
    y = (drawn.y0 - 0.04) / fig.get_figheight()
    fig.text(x, y, provenance_footer(png_path), ha="center", va="top", fontsize=6, color="0.35")
    for path, fmt in ((png_path, "png"), (pdf_path, "pdf")):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, metadata=_METADATA[fmt], bbox_inches="tight", pad_inches=0.1)
        atomic_write_bytes(Path(path), buffer.getvalue())
    plt.close(fig)
