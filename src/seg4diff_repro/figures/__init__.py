"""Figures for figures/ (seaborn, PNG and PDF)."""

from __future__ import annotations

import io
from pathlib import Path

from seg4diff_repro.atomic import atomic_write_bytes

# No time stamps or tool versions in the files, so that re-running an unchanged analysis gives identical bytes.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def save_figure(fig, png_path: Path, pdf_path: Path) -> None:
    """Write ``fig`` as PNG and PDF, each atomically, then close it."""
    import matplotlib.pyplot as plt

    for path, fmt in ((png_path, "png"), (pdf_path, "pdf")):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, metadata=_METADATA[fmt])
        atomic_write_bytes(Path(path), buffer.getvalue())
    plt.close(fig)
