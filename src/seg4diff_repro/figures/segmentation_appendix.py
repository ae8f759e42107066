"""The appendix's segmentation figures: per-(layer, head) heatmap (Fig. 4), timestep panels (Fig. 2),
and qualitative overlays (Figs. 21–26)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from seg4diff_repro.datasets.layout import voc_palette  # noqa: E402
from seg4diff_repro.figures import save_figure  # noqa: E402
from seg4diff_repro.tables.per_layer import METRICS  # noqa: E402

OVERLAY_ALPHA = 0.4  # detectron2 Visualizer.draw_sem_seg's default, used by the official demo


def plot_head_heatmap(scores: pd.DataFrame, title: str, png_path: Path, pdf_path: Path) -> None:
    """mIoU of every (layer, head): layers as rows, heads as columns (appendix Fig. 4)."""
    grid = scores.pivot(index="layer", columns="head", values="mIoU")
    sns.set_theme(style="white")
    width = max(6.0, 0.32 * grid.shape[1] + 2.5)
    fig, ax = plt.subplots(figsize=(width, 0.28 * grid.shape[0] + 2.0))
    sns.heatmap(grid, ax=ax, cmap="viridis", annot=grid.shape[1] <= 8, fmt=".0f", cbar_kws={"label": "mIoU (%)"})
    ax.set_title(textwrap.fill(title, width=int(11 * width)), fontsize=9)  # long titles name the stand-ins
    ax.set_xlabel("head")
    ax.set_ylabel("joint layer (0-based)")
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def plot_timestep_panels(panels: list[tuple[str, pd.DataFrame]], title: str, png_path: Path, pdf_path: Path) -> None:
    """One panel per dataset of segmentation scores against k (appendix Fig. 2 (a), (b))."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, table) in zip(axes[0], panels):
        long = table.melt(id_vars=["timestep_k"], value_vars=METRICS, var_name="metric", value_name="score")
        sns.lineplot(data=long, x="timestep_k", y="score", hue="metric", marker="o", ax=ax)
        paper = table.dropna(subset=["paper_mIoU"])
        if not paper.empty:
            ax.scatter(paper["timestep_k"], paper["paper_mIoU"], marker="*", s=160, color="black",
                       label="paper mIoU", zorder=3)
            ax.legend()
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("k (input noised to timesteps[-k])")
        ax.set_ylabel("score (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def colourise(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """[H, W] ids → [H, W, 3] uint8 colours; ignored pixels black."""
    colours = palette[np.clip(label, 0, len(palette) - 1)]
    colours[label == ignore_index] = 0
    return colours


def class_palette() -> np.ndarray:
    """The VOC colour map as [256, 3] uint8: class i gets the colour of VOC index i + 1 (0 is black)."""
    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[1:]


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def plot_overlays(
    rows: list[dict], title: str, png_path: Path, pdf_path: Path, legend: dict[int, str] | None = None
) -> None:
    """Rows of (image, ground truth overlay, prediction overlay), as the appendix's qualitative figures.

    Each row dict holds ``image`` [H, W, 3] uint8, ``label`` and ``prediction`` [H, W] class ids,
    ``ignore_index`` (unlabelled pixels, drawn black) and a ``caption``. ``legend``: class names for a colour key (open-vocabulary figures); None for
    unsupervised clusters, which the appendix draws without labels.
    """
    palette = class_palette()
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows) + 0.6), squeeze=False)
    for ax_row, row in zip(axes, rows):
        truth = colourise(row["label"], palette, row["ignore_index"])
        prediction = colourise(row["prediction"], palette, -1)  # every pixel gets a prediction
        for ax, picture, name in zip(
            ax_row,
            (row["image"], blend(row["image"], truth), blend(row["image"], prediction)),
            ("image", "ground truth", "prediction"),
        ):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{name}: {row['caption']}" if name == "image" else name, fontsize=7)
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i] / 255) for i in legend]
        fig.legend(handles, list(legend.values()), loc="lower center", ncol=min(6, len(legend)), fontsize=6,
                   frameon=False)
    fig.suptitle(textwrap.fill(title, width=90), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if legend else 0, 1, 1))
    save_figure(fig, png_path, pdf_path)
