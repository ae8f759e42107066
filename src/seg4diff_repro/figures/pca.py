"""Appendix Fig. 16: PCA of the image-token query, key and value features of every layer, shown as RGB.

The recipe of the official (unused) helper `visualize_pca_and_kmeans` (docs/method.md#pca-of-q-k-and-v): PCA with 3
components over the image tokens, each component min-max scaled to [0, 1] on its own, reshaped to the
token grid and used as RGB. Computed in float64 with an SVD of the centred features (scikit-learn's PCA
does the same); each component's sign is fixed so that its largest-magnitude loading is positive, so
the colours are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from seg4diff_repro.figures import save_figure, wrap_title  # noqa: E402

QKV = ("q", "k", "v")


def pca_projections(features: torch.Tensor, n_components: int = 3) -> torch.Tensor:
    """[N, C] features → [N, n_components] float64 scores on the leading principal components (on the CPU).

    The SVD runs where the features are: on a GPU the 72 float64 SVDs of SD3's 4096 x 1536 features take about a
    second, on a CPU minutes."""
    x = features.detach().to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    _, singular_values, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:n_components]
    # SVD signs are arbitrary: make each component's largest-|loading| entry positive.
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    signs[signs == 0] = 1
    return (x @ (components * signs).T).cpu()


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """Scale each column to [0, 1] independently (a constant column becomes 0)."""
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    return (scores - low) / torch.where(high > low, high - low, torch.ones_like(high))


def pca_rgb(features: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[N, C] image-token features → [rows, cols, 3] RGB in [0, 1] (3 components, each min-maxed)."""
    rows, cols = grid
    if features.shape[0] != rows * cols:
        raise ValueError(f"{features.shape[0]} tokens do not fill a {rows}x{cols} grid")
    return min_max(pca_projections(features, 3)).reshape(rows, cols, 3).numpy()


def plot_pca_qkv(
    image: np.ndarray, rgb: dict[tuple[int, str], np.ndarray], layers: Sequence[int], title: str, png: Path, pdf: Path,
    model: Mapping[str, str | None] | None = None,
) -> None:
    """One row per projection (q, k, v) and one column per layer, with the generated image first; ``model``: the
    record of the model that generated it (cited in the footer, kept in the files' metadata)."""
    fig, axes = plt.subplots(3, len(layers) + 1, figsize=(1.3 * (len(layers) + 1), 4.3), squeeze=False)
    for row, name in enumerate(QKV):
        axes[row, 0].set_axis_off()
        for column, layer in enumerate(layers, start=1):
            ax = axes[row, column]
            ax.imshow(rgb[(layer, name)], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=7)
            if column == 1:
                ax.set_ylabel(name, fontsize=9)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("generated", fontsize=7)
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, pdf, model)
