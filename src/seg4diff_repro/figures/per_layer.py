"""Per-layer segmentation curves (pACC, mACC, mIoU against the joint layer)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from seg4diff_repro.figures import layer_axis, save_figure, wrap_title  # noqa: E402
from seg4diff_repro.tables.per_layer import METRICS  # noqa: E402

TIMESTEP_AXIS = "t = k of N (input noised to schedule index N − k, N = 28 for SD3)"


def _plot_metric_curves(
    table: pd.DataFrame, x: str, xlabel: str, title: str, png_path: Path, pdf_path: Path,
    first_single: int | None = None,
) -> None:
    """pACC, mACC and mIoU against ``x``, one curve each; the paper's mIoU, where reported, as a star.

    Against layers (``x`` "layer") every layer gets a tick, and ``first_single`` marks Flux's single-stream blocks.
    """
    long = table.melt(id_vars=[x], value_vars=METRICS, var_name="metric", value_name="score")
    ticks = sorted(table[x].unique())
    sns.set_theme(style="whitegrid")
    width = max(6.4, 0.16 * len(ticks) + 1.6)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    sns.lineplot(data=long, x=x, y="score", hue="metric", marker="o", ax=ax)
    paper = table.dropna(subset=["paper_mIoU"])
    if not paper.empty:
        ax.scatter(paper[x], paper["paper_mIoU"], marker="*", s=160, color="black", label="paper mIoU", zorder=3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title(wrap_title(title, width - 1.4, 10), fontsize=10)
    ax.set_ylabel("score (%)")
    if x == "layer":
        layer_axis(ax, ticks, first_single, xlabel)
    else:
        ax.set_xticks(ticks)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def plot_per_layer(
    table: pd.DataFrame, png_path: Path, pdf_path: Path, title: str | None = None, first_single: int | None = None
) -> None:
    """Segmentation scores against the joint layer (Flux: ``first_single``, its first single-stream block)."""
    first = table.iloc[0]
    title = title or f"{first['model']} on {first['dataset']}: segmentation from I2T attention per layer"
    _plot_metric_curves(table, "layer", "joint layer (0-based)", title, png_path, pdf_path, first_single)


def plot_miou_by_model(tables: list[pd.DataFrame], png_path: Path, pdf_path: Path, title: str) -> None:
    """mIoU against the joint layer, one curve per model (e.g. a trained model and its random control)."""
    data = pd.concat(tables, ignore_index=True)
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=data, x="layer", y="mIoU", hue="model", marker="o", ax=ax)
    ax.set_title(wrap_title(title, 6.4, 10), fontsize=10)
    ax.set_ylabel("mIoU (%)")
    layer_axis(ax, sorted(data["layer"].unique()), label="joint layer (0-based)")
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def plot_timestep_sweep(table: pd.DataFrame, png_path: Path, pdf_path: Path) -> None:
    """Segmentation scores against k ("t = k of N"), at the table's layer (appendix Fig. 2)."""
    first = table.iloc[0]
    title = f"{first['model']} on {first['dataset']}, layer {first['layer']}: segmentation vs timestep"
    _plot_metric_curves(table, "timestep_k", TIMESTEP_AXIS, title, png_path, pdf_path)
