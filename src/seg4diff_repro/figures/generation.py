"""Figures of the generation analyses: fidelity curves over layers (appendix Figs. 5, 7, 10), labelled
image grids of per-layer perturbation and perturbed-I2T guidance (Figs. 18, 19), and the generations of the
baseline and the MAGNET-fine-tuned models side by side (Fig. 20)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from seg4diff_repro.figures import save_figure, wrap_title  # noqa: E402
from seg4diff_repro.tables.fidelity import METRIC_NAMES, METRICS  # noqa: E402

__all__ = ["plot_fidelity_curves", "plot_layer_grid", "plot_model_grid"]


def plot_fidelity_curves(table: pd.DataFrame, title: str, footer: str, png_path: Path, pdf_path: Path) -> None:
    """CLIP-I, CLIP-T and DINO (mean ± std over prompts) against the perturbed layer, one panel each.

    The unperturbed run is a dashed line (CLIP-I and DINO are 1 there by construction; its CLIP-T is
    the reference for the perturbed ones).
    """
    perturbed = table[table["layer"].notna()]
    reference = table[table["layer"].isna()]
    sns.set_theme(style="whitegrid")
    width = 4.0 * len(METRICS)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width, 4.2))
    layers = perturbed["layer"].astype(int).to_numpy()
    for ax, metric, colour in zip(axes, METRICS, sns.color_palette(n_colors=len(METRICS))):
        std = np.nan_to_num(perturbed[f"{metric}_std"].to_numpy(float))  # one prompt: no std
        ax.errorbar(layers, perturbed[f"{metric}_mean"].to_numpy(float), yerr=std, marker="o", capsize=3,
                    color=colour, label="perturbed layer (mean ± std over prompts)")
        if not reference.empty:
            ax.axhline(reference[f"{metric}_mean"].iloc[0], color="black", linestyle="--", linewidth=1,
                       label="unperturbed")
        ax.set_title(METRIC_NAMES[metric])
        ax.set_xlabel("perturbed joint layer (0-based)")
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7 if len(layers) > 12 else 9)
        # Plain values on the y axis: no "1e-3 + 0.99" offset for a reader to add back.
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    axes[0].set_ylabel("cosine similarity")
    # One legend for all panels, between the title and the axes, where it hides no curve.
    handles, labels = axes[0].get_legend_handles_labels()
    height = fig.get_figheight()
    title_text, footer_text = wrap_title(title, width, 10), wrap_title(footer, width, 7)
    title_inches = 0.08 + 10 * 1.2 / 72 * (title_text.count("\n") + 1)  # margin + lines of 10 pt
    fig.suptitle(title_text, fontsize=10)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - title_inches / height))
    fig.text(0.5, 0.01, footer_text, ha="center", va="bottom", fontsize=7)
    footer_inches = 0.05 + 7 * 1.2 / 72 * (footer_text.count("\n") + 1)
    fig.tight_layout(rect=(0, footer_inches / height, 1, 1 - (title_inches + 0.12) / height))
    save_figure(fig, png_path, pdf_path)


def plot_layer_grid(
    prompts: Sequence[str],
    reference: Sequence[np.ndarray],
    by_layer: dict[int, Sequence[np.ndarray]],
    reference_label: str,
    title: str,
    png_path: Path,
    pdf_path: Path,
    layers_per_row: int = 8,
) -> None:
    """One block per prompt: the reference image in the first column, then one labelled image per layer.

    ``reference`` and each ``by_layer[layer]`` hold one image per prompt (the same seed), in prompt order.
    Layers wrap after ``layers_per_row`` columns, as in the paper's 8-column grids.
    """
    layers = sorted(by_layer)
    columns = min(layers_per_row, len(layers))
    rows_per_prompt = math.ceil(len(layers) / columns)
    n_rows = rows_per_prompt * len(prompts)
    fig, axes = plt.subplots(n_rows, columns + 1, figsize=(1.25 * (columns + 1) + 0.6, 1.4 * n_rows + 0.6),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for p, prompt in enumerate(prompts):
        top = p * rows_per_prompt
        ax = axes[top, 0]
        ax.axis("on")  # a frameless axes would hide the prompt label too
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(reference[p])
        ax.set_title(reference_label, fontsize=7)
        label = "\n".join(textwrap.wrap(f"“{prompt}”", 24))
        ax.set_ylabel(label, fontsize=6.5, rotation=0, ha="right", va="center")
        for i, layer in enumerate(layers):
            ax = axes[top + i // columns, 1 + i % columns]
            ax.imshow(by_layer[layer][p])
            ax.set_title(f"Layer {layer}", fontsize=7)
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.tight_layout()
    save_figure(fig, png_path, pdf_path)


def _prompt_label(number: int, prompt: str, width: int = 26, max_lines: int = 7) -> str:
    """"(1) “prompt”" wrapped to ``width`` characters; a long caption is cut after ``max_lines`` lines with "…"."""
    lines = textwrap.wrap(f"({number}) “{prompt}”", width)
    return "\n".join(lines if len(lines) <= max_lines else [*lines[: max_lines - 1], lines[max_lines - 1] + " …"])


def plot_model_grid(
    prompts: Sequence[str],
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    title: str,
    footer: str,
    png_path: Path,
    pdf_path: Path,
    model: dict | None = None,
) -> None:
    """One row per model (``rows``: label and one image per prompt, in prompt order), one column per prompt.

    The caller checks that each column's images share their prompt and seed. ``model``: the record kept in the
    files' metadata (`save_figure`).
    """
    n_rows, n_columns = len(rows), len(prompts)
    fig, axes = plt.subplots(n_rows, n_columns, figsize=(1.45 * n_columns + 1.0, 1.5 * n_rows + 1.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_prompt_label(c + 1, prompts[c]), fontsize=5.5, loc="left", va="bottom")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.text(0.5, 0.005, wrap_title(footer, fig.get_figwidth(), 6.5), ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, png_path, pdf_path, model=model)
