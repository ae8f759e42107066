"""The appendix's segmentation figures: per-(layer, head) heatmap (Fig. 4), timestep panels (Fig. 2),
and qualitative overlays (Figs. 21–26)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from seg4diff_repro.datasets.layout import read_manifest, voc_palette  # noqa: E402
from seg4diff_repro.figures import save_figure, wrap_title  # noqa: E402
from seg4diff_repro.figures.per_layer import TIMESTEP_AXIS  # noqa: E402
from seg4diff_repro.tables.per_layer import METRICS  # noqa: E402

OVERLAY_ALPHA = 0.4  # detectron2 Visualizer.draw_sem_seg's default, used by the official demo


def plot_head_heatmap(scores: pd.DataFrame, title: str, png_path: Path, pdf_path: Path) -> None:
    """mIoU of every (layer, head): layers as rows, heads as columns (appendix Fig. 4)."""
    grid = scores.pivot(index="layer", columns="head", values="mIoU")
    sns.set_theme(style="white")
    width = max(6.0, 0.32 * grid.shape[1] + 2.5)
    fig, ax = plt.subplots(figsize=(width, 0.28 * grid.shape[0] + 2.0))
    sns.heatmap(grid, ax=ax, cmap="viridis", annot=grid.shape[1] <= 8, fmt=".0f", cbar_kws={"label": "mIoU (%)"})
    ax.set_title(wrap_title(title, width - 1.2, 9), fontsize=9)  # long titles name the stand-ins
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
        ax.set_xlabel(TIMESTEP_AXIS)
        ax.set_ylabel("score (%)")
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 10), fontsize=10)
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


# Overlay colours for datasets whose images draw each class in its own colour (toy-shapes), tried before the VOC
# colour map: neutral grey first (the background), then hues far from red, green, blue and yellow.
CONTRAST_COLOURS = (
    (128, 128, 128), (255, 0, 255), (0, 255, 255), (150, 0, 255), (0, 0, 0), (255, 255, 255), (0, 128, 128),
    (128, 0, 128), (64, 64, 64), (192, 192, 192),
)
MIN_HUE_DISTANCE = 40.0  # degrees between an overlay colour and any colour the images draw a class in


def _hue(rgb) -> float | None:
    """Hue in degrees, or None for a colour too grey or too dark to have one that reads."""
    import colorsys

    hue, saturation, value = colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))
    return None if saturation < 0.25 or value < 0.25 else 360 * hue


def _far_from(rgb, drawn: Sequence[Sequence[int]]) -> bool:
    hue = _hue(rgb)
    if hue is None:
        return True
    for other in map(_hue, drawn):
        if other is not None and min(abs(hue - other), 360 - abs(hue - other)) < MIN_HUE_DISTANCE:
            return False
    return True


def class_palette(class_names: Sequence[str], drawn_colours: Sequence[Sequence[int]] = (), extra: int = 0) -> np.ndarray:
    """[len(class_names) + extra, 3] uint8: one overlay colour per class of a prepared dataset (its full class
    list, so that every view of it, with or without background, and every figure colours a class alike), then
    ``extra`` colours for unmatched unsupervised proposals.

    The VOC colour map without its black (class i gets VOC index i + 1), unless the dataset's images draw
    each class in a colour of its own (``drawn_colours``, toy-shapes): then `CONTRAST_COLOURS` and the VOC map,
    keeping only colours whose hue is at least `MIN_HUE_DISTANCE` from every drawn colour's, so that a painted
    class is never mistaken for a drawn one.
    """
    voc = [tuple(colour) for colour in np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[1:].tolist()]
    candidates = voc if not drawn_colours else [c for c in dict.fromkeys([*CONTRAST_COLOURS, *voc])
                                                 if _far_from(c, drawn_colours)]
    needed = len(class_names) + extra
    if needed > len(candidates):
        raise ValueError(f"{needed} overlay colours needed (classes {len(class_names)} + {extra} proposals), "
                         f"only {len(candidates)} distinct ones available")
    return np.array(candidates[:needed], dtype=np.uint8)


def drawn_colours(dataset_root: Path) -> list[list[int]]:
    """The RGB each class is drawn in, where the prepared dataset records one (toy-shapes); else empty."""
    classes = read_manifest(dataset_root)["extra"].get("classes", [])
    return [entry["rgb"] for entry in classes if isinstance(entry, dict) and "rgb" in entry]


def view_palette(dataset_root: Path, view_names: Sequence[str], extra: int = 0) -> np.ndarray:
    """`class_palette` of the prepared dataset at ``dataset_root`` (its full class list and, for toy-shapes, the
    colours its images draw the classes in), in the ids of a view with classes ``view_names``, then ``extra``."""
    names = read_manifest(dataset_root)["class_names"]
    palette = class_palette(names, drawn_colours(dataset_root), extra)
    missing = [name for name in view_names if name not in names]
    if missing:
        raise ValueError(f"classes {missing} are not in {dataset_root}'s class list {names}")
    return np.concatenate([palette[[names.index(name) for name in view_names]], palette[len(names):]])


def colourise(label: np.ndarray, palette: np.ndarray, ignore_index: int | None = 255) -> tuple[np.ndarray, np.ndarray]:
    """[H, W] ids → ([H, W, 3] uint8 colours, [H, W] bool painted); ``ignore_index`` pixels are not painted."""
    painted = np.ones(label.shape, dtype=bool) if ignore_index is None else label != ignore_index
    colours = np.zeros((*label.shape, 3), dtype=np.uint8)
    colours[painted] = palette[label[painted]]
    return colours, painted


def blend(image: np.ndarray, colours: np.ndarray, painted: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``alpha`` of the colour over the image where ``painted``; elsewhere the image's own pixels."""
    mixed = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    return np.where(painted[..., None], mixed, image)


def plot_overlays(
    rows: list[dict], title: str, palette: np.ndarray, png_path: Path, pdf_path: Path,
    legend: dict[int, str] | None = None, footer: str = "",
) -> None:
    """Rows of (image, ground truth overlay, prediction overlay), as the appendix's qualitative figures.

    Each row dict holds ``image`` [H, W, 3] uint8, ``label`` and ``prediction`` [H, W] class ids (prediction ids
    past the classes: unmatched proposals), ``ignore_index`` (unlabelled pixels, left unpainted) and a
    ``caption``. ``palette``: a colour per id (`class_palette` of the dataset, in the ids of this view).
    ``legend``: class names for a colour key (open-vocabulary figures); None for unsupervised clusters, which
    the appendix draws without labels.
    """
    width = 7.5
    fig, axes = plt.subplots(len(rows), 3, figsize=(width, 2.5 * len(rows) + 1.0), squeeze=False)
    for ax_row, row in zip(axes, rows):
        truth = blend(row["image"], *colourise(row["label"], palette, row["ignore_index"]))
        prediction = blend(row["image"], *colourise(row["prediction"], palette, None))  # every pixel is predicted
        for ax, picture, name in zip(
            ax_row, (row["image"], truth, prediction), ("image", "ground truth", "prediction")
        ):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{name}: {row['caption']}" if name == "image" else name, fontsize=7)
    bottom = 0.0
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, facecolor=palette[i] / 255, edgecolor="0.5") for i in legend]
        fig.legend(handles, list(legend.values()), loc="lower center", ncol=min(6, len(legend)), fontsize=7,
                   frameon=False, bbox_to_anchor=(0.5, 0.025 if footer else 0.0))
        bottom = 0.05
    if footer:
        fig.text(0.5, 0.005, wrap_title(footer, width, 6.5), ha="center", va="bottom", fontsize=6.5, color="0.3")
        bottom += 0.03
    fig.suptitle(wrap_title(title, width, 9), fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    save_figure(fig, png_path, pdf_path)
