"""What the appendix figures and their tables show: Fig. 1's prompt list, readable titles, step labels, overlays
that leave unlabelled pixels alone, and headers that describe their rows.

References: prompts copied by hand from the appendix text, hand-computed blends, and matplotlib's own layout of
the drawn figure (text extents against the figure's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from seg4diff_repro.cli import main
from seg4diff_repro.figures.prompts import prompt_list_figure
from seg4diff_repro.generation.prompts import load_prompts

# Some of Fig. 1's prompts, copied by hand from the appendix (typos and curly quotes are the appendix's).
APPENDIX_PROMPTS = {
    1: "A red colored car.",
    16: "A triangular pink stop sign. A pink stop sign in the shape of a triangle.",
    29: "Rbefraigerator.",
    23: "An American multinational technology company that focuses on artificial intelligence, search engine, "
        "online advertising, cloud computing, computer software, quantum computing, e-commerce, and consumer "
        "electronics.",
    50: "New York Skyline with ’Google Research Pizza Cafe’ written with fireworks on the sky.",
}


def figure_outputs(tmp_path: Path, stem: str, table: bool = True) -> dict[str, Path]:
    exts = ("csv", "markdown", "png", "pdf") if table else ("png", "pdf")
    return {ext: tmp_path / f"{stem}.{'md' if ext == 'markdown' else ext}" for ext in exts}


def as_arguments(outputs: dict[str, Path]) -> list[str]:
    return [arg for ext, path in outputs.items() for arg in (f"--{ext}", str(path))]


def test_fig01_lists_all_50_prompts_verbatim_with_their_use(tmp_path):
    outputs = figure_outputs(tmp_path, "fig01")
    usage = {"fidelity": 4, "value norms": None}
    main(["prompts-figure", "--usage", json.dumps(usage), "--title", "Appendix Fig. 1", *as_arguments(outputs)])
    table = pd.read_csv(outputs["csv"])
    assert table["number"].tolist() == list(range(1, 51))
    assert table["prompt"].nunique() == 50
    for number, prompt in APPENDIX_PROMPTS.items():
        assert table.loc[number - 1, "prompt"] == prompt
    assert table["used_by"].tolist() == ["fidelity, value norms"] * 4 + ["value norms"] * 46
    markdown = outputs["markdown"].read_text()
    for number, prompt in APPENDIX_PROMPTS.items():
        assert f"| {prompt}" in markdown, number
    assert "fidelity: the first 4; value norms: all 50" in markdown
    assert outputs["png"].read_bytes().startswith(b"\x89PNG") and outputs["pdf"].read_bytes().startswith(b"%PDF-")


def test_fig01_figure_draws_each_prompt_whole_and_inside_the_page():
    prompts = load_prompts()
    fig = prompt_list_figure(prompts, "Appendix Fig. 1: the 50 DrawBench prompts", "footer")
    drawn = [text.get_text() for text in fig.texts if text.get_text()[:1].isdigit()]
    # Undo the wrapping: continuation lines are indented by five spaces.
    assert [" ".join(part.strip() for part in entry.split("\n")) for entry in drawn] == [
        f"{number}. {prompt}" for number, prompt in enumerate(prompts, 1)
    ]
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for text in [*fig.texts, fig._suptitle]:
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    # The two columns do not overlap.
    left = [t for t in fig.texts if t.get_position()[0] < 0.5 and t.get_text()[:1].isdigit()]
    right_x0 = min(t.get_window_extent(renderer).x0 for t in fig.texts if t.get_position()[0] > 0.5)
    assert max(t.get_window_extent(renderer).x1 for t in left) < right_x0


def test_tab01_header_describes_every_row_not_only_the_post_softmax_one(tmp_path):
    rows = [{"model": "toy_sd3", "dataset": "toy_shapes", "layer": 0, "timestep_k": 8, "post_softmax": softmax,
             "min_max": minmax, "pACC": 90.0, "mACC": 80.0, "mIoU": 70.0, "paper_mIoU": None, "diff_mIoU": None}
            for softmax in (False, True) for minmax in (False, True)]
    pd.DataFrame(rows).to_csv(tmp_path / "variants.csv", index=False)
    provenance = {"model": "toy_sd3", "dataset": "toy_shapes", "layer": 0, "mIoU": 70.0, "prompt": "oracle",
                  "resize": "stretch", "attention": "post-softmax, head mean", "seed": 0, "images": 6}
    pd.DataFrame([provenance]).to_csv(tmp_path / "provenance.csv", index=False)
    outputs = figure_outputs(tmp_path, "tab01", table=True)
    del outputs["png"], outputs["pdf"]
    main(["normalisation-panels", "--tables", str(tmp_path / "variants.csv"), "--labels", "VOC20",
          "--provenance", str(tmp_path / "provenance.csv"), "--title", "Appendix Table 1", *as_arguments(outputs)])
    header, _, body = outputs["markdown"].read_text().partition("| model")
    assert "pre-softmax" in header and "post-softmax" in header  # the note names both, as the rows are
    settings = header.split("\n")[2]
    assert settings.startswith("model = toy_sd3") and "softmax" not in settings
    assert body.count("| False ") >= 2 and body.count("| True ") >= 2
