"""Value-norm figures: layer × head heatmaps (appendix Fig. 15) and per-layer curves (Figs. 6, 9)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # rules run without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from seg4diff_repro.figures import layer_axis, save_figure, wrap_title  # noqa: E402
from seg4diff_repro.attention.value_norms import GROUPS  # noqa: E402

GROUP_TITLES = {"image": "image tokens", "text": "text tokens", "prompt": "prompt tokens only"}


def plot_value_norm_heads(per_head: pd.DataFrame, title: str, step_labels: dict[int, str], png: Path, pdf: Path) -> None:
    """One heatmap (layer × head, mean ‖V‖ of the head's slice) per token group and timestep.

    ``step_labels``: the label of each timestep k (`figures.step_label`), above its row of panels.
    """
    timesteps = sorted(per_head["timestep_k"].unique(), reverse=True)
    fig, axes = plt.subplots(len(timesteps), len(GROUPS), figsize=(3.6 * len(GROUPS), 3.2 * len(timesteps)),
                             squeeze=False)
    for row, k in enumerate(timesteps):
        at_k = per_head[per_head["timestep_k"] == k]
        for column, group in enumerate(GROUPS):
            grid = at_k.pivot(index="layer", columns="head", values=group)
            ax = axes[row, column]
            image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma", origin="upper", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
            ax.set_title(f"{GROUP_TITLES[group]}\n{step_labels[k]}", fontsize=8)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_yticks(range(len(grid.index)), [str(layer) for layer in grid.index], fontsize=6)
            ax.set_xticks(range(len(grid.columns)), [str(head) for head in grid.columns], fontsize=6)
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.tight_layout()
    save_figure(fig, png, pdf)


def plot_value_norm_layers(
    per_layer: pd.DataFrame, title: str, step_labels: dict[int, str], png: Path, pdf: Path
) -> None:
    """Mean ‖V‖ (whole value vector) against the layer, one curve per token group, one panel per timestep.

    ``step_labels``: each timestep's label (`figures.step_label`). For Flux the single-stream blocks are
    shaded and the boundary marked.
    """
    timesteps = sorted(per_layer["timestep_k"].unique(), reverse=True)
    sns.set_theme(style="whitegrid")
    n_layers = per_layer["layer"].nunique()
    panel_width = max(5.6, 0.16 * n_layers)
    fig, axes = plt.subplots(len(timesteps), 1, figsize=(panel_width + 1.6, 3.4 * len(timesteps) + 0.8),
                             squeeze=False, sharey=True)
    single = per_layer.loc[per_layer["block"] == "single", "layer"]
    for ax, k in zip(axes[:, 0], timesteps):
        at_k = per_layer[per_layer["timestep_k"] == k]
        long = at_k.melt(id_vars=["layer"], value_vars=list(GROUPS), var_name="tokens", value_name="norm")
        sns.lineplot(data=long, x="layer", y="norm", hue="tokens", marker="o", markersize=4, ax=ax,
                     legend=ax is axes[0, 0])
        layer_axis(ax, sorted(at_k["layer"].unique()), None if single.empty else int(single.min()))
        ax.set_title(step_labels[k], fontsize=9)
        ax.set_ylabel("mean L2 norm of V")
    sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(1.01, 1), title="tokens")
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.tight_layout()
    save_figure(fig, png, pdf)
