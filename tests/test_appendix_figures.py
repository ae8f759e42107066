"""What the appendix figures and their tables show: Fig. 1's prompt list, readable titles, step labels, overlays
that leave unlabelled pixels alone, and headers that describe their rows.

References: prompts copied by hand from the appendix text, hand-computed blends, and matplotlib's own layout of
the drawn figure (text extents against the figure's).
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seg4diff_repro.cli import main
from seg4diff_repro.datasets.toy_shapes import TOY_CLASS_NAMES, TOY_CLASSES, generate_toy_shapes
from seg4diff_repro.figures import step_label, wrap_title
from seg4diff_repro.figures.generation import plot_fidelity_curves
from seg4diff_repro.figures.per_layer import plot_per_layer
from seg4diff_repro.figures.prompts import prompt_list_figure
from seg4diff_repro.figures.segmentation_appendix import blend, colourise, plot_overlays, view_palette
from seg4diff_repro.generation.prompts import load_prompts
from seg4diff_repro.tables.fidelity import METRICS as FIDELITY_METRICS
from test_workflow import copy_workflow, planned_jobs, snakemake

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


def panel_inputs(tmp_path: Path, kind: str) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Two panels' tables (VOC20's and COCO-Object's stand-ins) and their raw scores' settings, which differ the
    way the official protocol makes them differ: background dropped for VOC20, ignored for COCO-Object."""
    provenance = {
        "VOC20": {"model": "toy_sd3", "dataset": "toy_shapes", "layer": 0, "mIoU": 70.0, "prompt": "oracle",
                  "background": "drop", "resize": "stretch", "attention": "post-softmax, head mean", "seed": 0,
                  "images": 6, "code_version": "0.1.0, code aaaaaaaaaaaaaaaa, commit 1111111111"},
        "COCO-Object": {"model": "toy_sd3", "dataset": "toy_shapes_object", "layer": 0, "mIoU": 60.0,
                        "prompt": "oracle", "background": "ignore", "resize": "stretch",
                        "attention": "post-softmax, head mean", "seed": 0, "images": 5,
                        "code_version": "0.1.0, code bbbbbbbbbbbbbbbb, commit 2222222222"},
    }
    arguments = {"--tables": [], "--labels": [], "--provenance": []}
    for label, settings in provenance.items():
        if kind == "normalisation":
            rows = [{"model": "toy_sd3", "dataset": settings["dataset"], "layer": 0, "timestep_k": 8,
                     "post_softmax": softmax, "min_max": minmax, "pACC": 90.0, "mACC": 80.0, "mIoU": 70.0,
                     "paper_mIoU": None, "diff_mIoU": None}
                    for softmax in (False, True) for minmax in (False, True)]
        else:
            rows = [{"model": "toy_sd3", "dataset": settings["dataset"], "layer": 0, "timestep_k": k, "sigma": k / 28,
                     "pACC": 90.0, "mACC": 80.0, "mIoU": 70.0 + k, "paper_mIoU": None, "best_k": 8,
                     "paper_best_k": 8} for k in (4, 8)]
        stem = f"{kind}_{settings['dataset']}"
        pd.DataFrame(rows).to_csv(tmp_path / f"{stem}.csv", index=False)
        pd.DataFrame([settings]).to_csv(tmp_path / f"{stem}_scores.csv", index=False)
        arguments["--tables"].append(str(tmp_path / f"{stem}.csv"))
        arguments["--labels"].append(label)
        arguments["--provenance"].append(str(tmp_path / f"{stem}_scores.csv"))
    return arguments, provenance


def flags(arguments: dict[str, list[str]]) -> list[str]:
    return [arg for flag, values in arguments.items() for arg in (flag, *values)]


def test_tab01_header_describes_every_row_not_only_the_post_softmax_one(tmp_path):
    arguments, _ = panel_inputs(tmp_path, "normalisation")
    outputs = figure_outputs(tmp_path, "tab01", table=True)
    del outputs["png"], outputs["pdf"]
    main(["normalisation-panels", *flags(arguments), "--title", "Appendix Table 1", *as_arguments(outputs)])
    header, _, body = outputs["markdown"].read_text().partition("| model")
    assert "pre-softmax" in header and "post-softmax" in header  # the note names both, as the rows are
    settings = [line for line in header.split("\n") if line.startswith("**")]
    assert len(settings) == 2 and all("model = toy_sd3" in line and "softmax" not in line for line in settings)
    assert body.count("| False ") >= 4 and body.count("| True ") >= 4
    assert "attention" not in pd.read_csv(outputs["csv"])  # the rows' own post_softmax and min_max say it


def test_panel_tables_tie_each_panels_settings_to_its_own_rows(tmp_path):
    """Appendix Table 1 and Fig. 2 hold a VOC20 panel (background dropped) and a COCO-Object panel (background
    ignored): every row carries its own panel's settings, and the Markdown states each panel's on its own line."""
    for command, kind, figure in (("normalisation-panels", "normalisation", False),
                                  ("timestep-panels", "timestep", True)):
        arguments, provenance = panel_inputs(tmp_path, kind)
        outputs = figure_outputs(tmp_path, kind, table=True)
        if not figure:
            del outputs["png"], outputs["pdf"]
        main([command, *flags(arguments), "--title", "Appendix", *as_arguments(outputs)])
        table = pd.read_csv(outputs["csv"])
        assert set(table["panel"]) == set(provenance)
        markdown = outputs["markdown"].read_text()
        for label, settings in provenance.items():
            rows = table[table["panel"] == label]
            assert (rows["dataset"] == settings["dataset"]).all()
            for key in ("background", "images", "code_version"):
                assert rows[key].tolist() == [settings[key]] * len(rows), (command, label, key)
            line = next(line for line in markdown.splitlines() if line.startswith(f"**{label}**: "))
            assert f"dataset = {settings['dataset']}," in line and f"background = {settings['background']}," in line
            assert f"images = {settings['images']}," in line and f"code_version = {settings['code_version']}." in line
            assert f"| {label} " in markdown  # the rows name their panel as the settings line does


def test_panel_settings_that_belong_to_another_dataset_are_refused(tmp_path):
    arguments, _ = panel_inputs(tmp_path, "normalisation")
    arguments["--provenance"].reverse()  # COCO-Object's settings for the VOC20 panel and vice versa
    outputs = figure_outputs(tmp_path, "tab01", table=True)
    del outputs["png"], outputs["pdf"]
    with pytest.raises(ValueError, match=r"panel 'VOC20': its rows are dataset \['toy_shapes'\] but its settings come "
                                         r"from dataset 'toy_shapes_object'"):
        main(["normalisation-panels", *flags(arguments), "--title", "Appendix Table 1", *as_arguments(outputs)])


# --- figures a reviewer reads without squinting ------------------------------------------------------------------


class KeptFigures:
    """Stands in for `save_figure`: keeps each figure (drawn, so that layout and text extents are final)."""

    def __init__(self):
        self.figures = []

    def __call__(self, fig, png_path, pdf_path) -> None:
        fig.canvas.draw()
        self.figures.append(fig)


def keep_figures(monkeypatch, module: str) -> KeptFigures:
    kept = KeptFigures()
    monkeypatch.setattr(f"seg4diff_repro.figures.{module}.save_figure", kept)
    return kept


def assert_inside(fig, artist) -> None:
    box, page = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, (
        artist.get_text()
    )


def test_step_label_names_the_schedule_index_and_sigma():
    assert step_label(8, 28, 20, 0.51507) == "t = 8 of 28: schedule index 20, σ = 0.515"
    assert step_label(28, 50, 22, 0.6773) == "t = 28 of 50: schedule index 22, σ = 0.677"
    assert step_label(28, 50, 0, 1.0, paper_steps=28) == (
        "t = 28 of 28, on a 50-step schedule: schedule index 0, σ = 1.000"
    )


def per_layer_table(n_layers: int) -> pd.DataFrame:
    return pd.DataFrame({"model": "flux_dev", "dataset": "voc20", "layer": range(n_layers), "pACC": 80.0,
                         "mACC": 70.0, "mIoU": np.linspace(20, 40, n_layers), "paper_mIoU": np.nan})


def test_long_per_layer_title_is_wrapped_inside_the_figure(monkeypatch):
    kept = keep_figures(monkeypatch, "per_layer")
    title = ("Appendix Fig. 11: per-layer segmentation, toy_flux_random for FLUX.1-dev on toy_shapes for VOC20, "
             "t = 8 of 50: schedule index 42, σ = 0.232")
    plot_per_layer(per_layer_table(4), Path("unused.png"), Path("unused.pdf"), title=title)
    fig = kept.figures[0]
    ax = fig.axes[0]
    assert ax.get_title().replace("\n", " ") == title and "\n" in ax.get_title()
    assert_inside(fig, ax.title)


def test_flux_per_layer_figure_ticks_every_layer_and_marks_the_single_stream_blocks(monkeypatch):
    kept = keep_figures(monkeypatch, "per_layer")
    plot_per_layer(per_layer_table(57), Path("unused.png"), Path("unused.pdf"), title="Fig. 11", first_single=19)
    fig = kept.figures[0]
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == list(range(57))
    # Tick labels do not overlap: each ends before the next begins.
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()]
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    boundaries = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert boundaries == [18.5]  # between double-stream block 18 and single-stream block 19
    assert "double-stream blocks 0–18, single-stream blocks 19–56" in ax.get_xlabel()
    assert_inside(fig, ax.xaxis.label)
    (shading,) = ax.patches  # the single-stream blocks, from the boundary to the last layer
    assert shading.get_x() == 18.5 and shading.get_x() + shading.get_width() >= 56


def test_fidelity_axes_show_plain_values_and_the_legend_covers_no_axes(monkeypatch):
    kept = keep_figures(monkeypatch, "generation")
    rows = [{"layer": None, **{f"{m}_mean": 1.0 for m in FIDELITY_METRICS}, **{f"{m}_std": 0.0 for m in FIDELITY_METRICS}}]
    for layer in range(6):
        # Values within 1e-4 of each other: matplotlib would print them as an offset ("+9.999e-1").
        rows.append({"layer": layer, **{f"{m}_mean": 0.99991 + 1e-5 * layer for m in FIDELITY_METRICS},
                     **{f"{m}_std": 1e-6 for m in FIDELITY_METRICS}})
    plot_fidelity_curves(pd.DataFrame(rows), "Fig. 5", "footer", Path("unused.png"), Path("unused.pdf"))
    fig = kept.figures[0]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.yaxis.get_major_formatter().get_offset() == ""
        assert ax.get_legend() is None
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))
    assert_inside(fig, fig._suptitle)


def test_overlay_leaves_ignored_pixels_as_the_image_and_blends_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    label = rng.integers(0, 3, size=(5, 6))
    label[0, :] = 255
    label[3, 2] = 255
    palette = np.array([[200, 0, 200], [0, 200, 200], [90, 90, 90]], dtype=np.uint8)
    result = blend(image, *colourise(label, palette, 255))
    for y in range(5):
        for x in range(6):
            if label[y, x] == 255:
                assert (result[y, x] == image[y, x]).all()
            else:  # 0.6 of the image, 0.4 of the class colour (detectron2's alpha), rounded
                expected = [round(0.6 * int(i) + 0.4 * int(c)) for i, c in zip(image[y, x], palette[label[y, x]])]
                assert result[y, x].tolist() == expected


def test_overlay_figure_draws_the_ground_truth_panel_without_painting_ignored_pixels(monkeypatch):
    kept = keep_figures(monkeypatch, "segmentation_appendix")
    image = np.full((4, 4, 3), 77, dtype=np.uint8)
    label = np.array([[0, 0, 255, 255]] * 4)
    row = {"image": image, "label": label, "prediction": np.zeros((4, 4), dtype=int), "ignore_index": 255,
           "caption": "x"}
    palette = np.array([[255, 0, 255]], dtype=np.uint8)
    plot_overlays([row], "Fig. 21", palette, Path("unused.png"), Path("unused.pdf"), legend={0: "circle"})
    truth = np.asarray(kept.figures[0].axes[1].images[0].get_array())
    assert (truth[:, 2:] == 77).all()  # ignored: the image itself
    assert truth[:, :2].tolist() == [[[round(0.6 * 77 + 0.4 * 255), round(0.6 * 77), round(0.6 * 77 + 0.4 * 255)]] * 2] * 4


def hue(rgb) -> float | None:
    h, s, v = colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))
    return None if s < 0.25 or v < 0.25 else 360 * h


def test_toy_overlay_colours_are_one_per_class_and_none_of_the_shapes_own(tmp_path):
    root = tmp_path / "toy_shapes"
    generate_toy_shapes(root, n_train=1, n_val=2)
    with_background = view_palette(root, list(TOY_CLASS_NAMES), extra=4)
    without = view_palette(root, list(TOY_CLASS_NAMES[1:]), extra=4)
    # One palette per dataset: each class keeps its colour in both views (Figs. 21-23 vs Figs. 24-26).
    assert (with_background[1:5] == without[:4]).all()
    assert len({tuple(colour) for colour in with_background.tolist()}) == len(with_background)  # all distinct
    for colour in with_background.tolist():
        for toy in TOY_CLASSES:  # red circle, blue square, green triangle, yellow star
            ours, theirs = hue(colour), hue(toy.rgb)
            if ours is not None:
                assert min(abs(ours - theirs), 360 - abs(ours - theirs)) >= 40, (colour, toy.name)


def test_fig01_is_a_target_of_all_generation(tmp_path):
    workdir = copy_workflow(tmp_path)
    dry_run = snakemake(workdir, "-n", "-p", "all_generation")
    assert "fig01_drawbench_prompts" in planned_jobs(dry_run)
    for path in ("figures/toy/fig01_drawbench_prompts.png", "paper_tables/toy/fig01_drawbench_prompts.md"):
        assert path in dry_run.stdout
    # The toy config uses the first 2 prompts for both analyses, and the figure says so.
    assert '"fidelity (Figs. 5, 7, 10)": 2' in dry_run.stdout and '"value norms (Figs. 6, 9, 15)": 2' in dry_run.stdout


def test_wrapped_titles_fit_and_keep_step_labels_whole():
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    title = ("Appendix Fig. 21: open-vocabulary overlays, toy_sd3 for SD3-medium on toy_shapes for COCO-Object, "
             "layer 0, t = 8 of 28: schedule index 20, σ = 0.515")
    for width in (3.0, 4.0, 5.5, 7.2):
        lines = wrap_title(title, width, 9).split("\n")
        assert " ".join(lines) == title
        for line in lines:  # measured with matplotlib's own metrics of the default font
            assert TextToPath().get_text_width_height_descent(line, FontProperties(size=9), ismath=False)[0] <= 72 * width
        assert any("t = 8 of 28:" in line for line in lines) and any("σ = 0.515" in line for line in lines)
        assert not any(line.endswith(("layer", "=", "t")) for line in lines)
