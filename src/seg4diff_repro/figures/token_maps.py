"""Token attention maps recorded during generation: appendix Figs. 3, 12, 13–14 and 17.

Every map is one token's post-softmax attention over the image-token grid (I2T: the token's column over
the image queries; T2I: the token's row over the image keys), drawn with its own colour range, as
attention-map figures usually are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from seg4diff_repro.figures import save_figure, wrap_title  # noqa: E402

CMAP = "viridis"


@dataclass(frozen=True)
class PromptMaps:
    """The maps of some tokens of one generated prompt, [tokens, rows, cols] per direction."""

    prompt: str
    image: np.ndarray  # [H, W, 3] in [0, 1]
    labels: list[str]
    i2t: np.ndarray
    t2i: np.ndarray


def _map(ax, values: np.ndarray, label: str | None = None) -> None:
    ax.imshow(values, cmap=CMAP, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if label is not None:
        ax.set_xlabel(label, fontsize=7, labelpad=2)


def _image(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title, fontsize=6, wrap=True)


def _lines(n: int, per_row: int) -> list[range]:
    return [range(start, min(start + per_row, n)) for start in range(0, n, per_row)]


def plot_direction_maps(entries: Sequence[PromptMaps], title: str, png: Path, pdf: Path, per_row: int = 10,
                        model: Mapping[str, str | None] | None = None) -> None:
    """Figs. 3 and 12: per prompt, the generated image, then rows of I2T maps and rows of T2I maps.

    ``model`` (here and below): the record of the model that generated the images, for `save_figure`.
    """
    columns = min(per_row, max(len(entry.labels) for entry in entries))
    blocks = [(entry, _lines(len(entry.labels), columns)) for entry in entries]
    n_rows = sum(2 * len(lines) for _, lines in blocks)
    fig, axes = plt.subplots(n_rows, columns + 1, figsize=(1.15 * (columns + 1), 1.3 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    row = 0
    for entry, lines in blocks:
        _image(axes[row, 0], entry.image, f"“{entry.prompt}”")
        for direction, maps in (("I2T", entry.i2t), ("T2I", entry.t2i)):
            for line in lines:
                for column, token in enumerate(line, start=1):
                    ax = axes[row, column]
                    ax.set_axis_on()
                    _map(ax, maps[token], entry.labels[token])
                    if column == 1:
                        ax.set_ylabel(direction, fontsize=8)
                row += 1
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, pdf, model)


def plot_head_maps(
    prompt: str,
    image: np.ndarray,
    token: str,
    maps: np.ndarray,
    layers: Sequence[int],
    title: str,
    png: Path,
    pdf: Path,
    model: Mapping[str, str | None] | None = None,
) -> None:
    """Figs. 13–14: per layer, the head-mean I2T map of one token and every head's map ([L, H, rows, cols])."""
    heads = maps.shape[1]
    fig, axes = plt.subplots(
        len(layers), heads + 2, figsize=(1.05 * (heads + 2), 1.15 * len(layers) + 0.6), squeeze=False
    )
    for ax in axes[:, 0]:
        ax.set_axis_off()
    _image(axes[0, 0], image, f"“{prompt}”\ntoken “{token}”")
    for row, layer in enumerate(layers):
        _map(axes[row, 1], maps[row].mean(axis=0))
        axes[row, 1].set_ylabel(f"layer {layer}", fontsize=8)
        for head in range(heads):
            _map(axes[row, head + 2], maps[row, head])
        if row == 0:
            axes[row, 1].set_title("mean", fontsize=7)
            for head in range(heads):
                axes[row, head + 2].set_title(f"head {head}", fontsize=6)
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, pdf, model)


def plot_token_grid(
    image: np.ndarray, labels: Sequence[str], maps: np.ndarray, title: str, png: Path, pdf: Path, per_row: int = 11,
    model: Mapping[str, str | None] | None = None,
) -> None:
    """Fig. 17: the generated image and the I2T map of every text position ([tokens, rows, cols])."""
    lines = _lines(len(labels), per_row)
    fig, axes = plt.subplots(
        len(lines), per_row + 1, figsize=(1.0 * (per_row + 1), 1.1 * len(lines) + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    _image(axes[0, 0], image, "generated")
    for row, line in enumerate(lines):
        for column, token in enumerate(line, start=1):
            axes[row, column].set_axis_on()
            _map(axes[row, column], maps[token], f"{token}: {labels[token]}")
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, pdf, model)
