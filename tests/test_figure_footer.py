"""Every figure carries a footer naming its outputs folder and the code that made it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from seg4diff_repro.figures import provenance_footer, save_figure  # noqa: E402
from seg4diff_repro.provenance import code_fingerprint, git_state  # noqa: E402


def test_footer_names_the_outputs_folder_version_fingerprint_and_commit(tmp_path: Path):
    footer = provenance_footer(tmp_path / "figures/paper/fig05.png")
    assert footer.startswith("paper outputs · seg4diff-repro 0.1.0, code ")
    assert code_fingerprint("package") in footer
    commit = git_state()["commit"]
    assert (f"commit {commit[:10]}" if commit else "no git commit") in footer
    assert "outputs" not in provenance_footer(tmp_path / "elsewhere/fig.png")  # only under figures/<name>/


def test_the_footer_is_drawn_below_the_plot_not_over_it(tmp_path: Path):
    def draw() -> plt.Figure:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([0, 1], [0, 1], color="black")
        ax.set_xlabel("layer")
        return fig

    plain = tmp_path / "plain.png"
    fig = draw()
    fig.savefig(plain, dpi=150, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    footed = tmp_path / "figures/toy/footed.png"
    save_figure(draw(), footed, footed.with_suffix(".pdf"))
    plain_pixels = np.asarray(Image.open(plain).convert("L"))
    footed_pixels = np.asarray(Image.open(footed).convert("L"))
    assert footed_pixels.shape[0] > plain_pixels.shape[0]  # the canvas grew to hold the footer
    # The plot keeps its ink (nothing drawn over it) and the footer's ink lies in the rows beneath it.
    height = plain_pixels.shape[0] - 15  # the plot, without the 0.1 inch padding under it (15 px at 150 dpi)
    plot_ink, footer_ink = (footed_pixels[:height] < 128).sum(), (footed_pixels[height:] < 200).sum()
    assert abs(plot_ink - (plain_pixels[:height] < 128).sum()) <= 0.02 * (plain_pixels[:height] < 128).sum()
    assert footer_ink > 0
    assert footed.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
