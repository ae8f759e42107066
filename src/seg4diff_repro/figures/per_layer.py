"""Per-layer segmentation curves (pACC, mACC, mIoU against the joint layer)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from seg4diff_repro.figures import save_figure  # noqa: E402
from seg4diff_repro.tables.per_layer import METRICS  # noqa: E402


def _plot_metric_curves(table: pd.DataFrame, x: str, xlabel: str, title: str, png_path: Path, pdf_path: Path) -> None:
    """pACC, mACC and mIoU against ``x``, one curve each; the paper's mIoU, where reported, as a star."""
    long = table.melt(id_vars=[x], value_vars=METRICS, var_name="metric", value_name="score")
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=long, x=x, y="score", hue="metric", marker="o", ax=ax)
    paper = table.dropna(subset=["paper_mIoU"])
    if not paper.empty:
        ax.scatter(paper[x], paper["paper_mIoU"], marker="*", s=160, color="black", label="paper mIoU", zorder=3)
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (%)")
    ax.set_xticks(sorted(table[x].unique()))
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def plot_per_layer(table: pd.DataFrame, png_path: Path, pdf_path: Path, title: str | None = None) -> None:
    """Segmentation scores against the joint layer."""
    first = table.iloc[0]
    title = title or f"{first['model']} on {first['dataset']}: segmentation from I2T attention per layer"
    _plot_metric_curves(table, "layer", "joint layer (0-based)", title, png_path, pdf_path)


def plot_miou_by_model(tables: list[pd.DataFrame], png_path: Path, pdf_path: Path, title: str) -> None:
    """mIoU against the joint layer, one curve per model (e.g. a trained model and its random control)."""
    data = pd.concat(tables, ignore_index=True)
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=data, x="layer", y="mIoU", hue="model", marker="o", ax=ax)
    ax.set_title(title)
    ax.set_xlabel("joint layer (0-based)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(sorted(data["layer"].unique()))
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def plot_timestep_sweep(table: pd.DataFrame, png_path: Path, pdf_path: Path) -> None:
    """Segmentation scores against k ("t = k of N"), at the table's layer (appendix Fig. 2)."""
    first = table.iloc[0]
    title = f"{first['model']} on {first['dataset']}, layer {first['layer']}: segmentation vs timestep"
    _plot_metric_curves(table, "timestep_k", "k (input noised to timesteps[-k])", title, png_path, pdf_path)
