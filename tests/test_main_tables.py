"""Main Tables 1 and 2: every column of the paper's tables, the paper's numbers, and each row's own settings.

References: the paper's tables as transcribed in docs/method.md#reported-numbers (column order and numbers copied
by hand below), and the synthetic score files each row is built from.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest

from magnet_adapters import plan_adapters
from seg4diff_repro.cli import main
from test_workflow import REPO, copy_workflow, snakemake

# The paper's columns in its order and its numbers (docs/method.md#reported-numbers: main Tables 1 and 2).
TABLE1 = {
    "columns": ["VOC20", "COCO-Object", "PC59", "ADE20K-150", "Cityscapes"],
    "SD3-medium": [89.2, 62.0, 49.0, 34.2, 26.5],
    "SD3.5-medium": [86.1, 57.8, 43.4, 30.7, 23.8],
    "FLUX.1-dev": [83.1, 50.6, 38.2, 23.9, 17.1],
    "SD3-medium + MAGNET (SA-1B)": [89.1, 62.0, 49.1, 34.7, 25.4],
    "SD3-medium + MAGNET (COCO)": [89.8, 62.9, 51.2, 35.2, 26.0],
}
TABLE2 = {
    "columns": ["VOC21 (with background)", "PC59 (with background)", "COCO-Object (with background)", "COCO-Stuff-27",
                "Cityscapes", "ADE20K-150"],
    "SD3-medium": [54.9, 52.6, 38.5, 49.7, 24.2, 44.9],
    "SD3.5-medium": [52.3, 52.9, 36.8, 47.1, 24.2, 41.5],
    "SD3-medium + MAGNET (SA-1B)": [55.1, 52.8, 39.0, 50.8, 24.2, 45.0],
    "SD3-medium + MAGNET (COCO)": [56.1, 53.5, 38.8, 53.5, 24.4, 45.4],
}
KEYS = {"VOC20": "voc20", "COCO-Object": "coco_object", "PC59": "pc59", "ADE20K-150": "ade150",
        "Cityscapes": "cityscapes", "VOC21 (with background)": "voc21",
        "COCO-Object (with background)": "coco_object", "PC59 (with background)": "pc59", "COCO-Stuff-27": "coco_stuff27"}
MODEL_KEYS = {"SD3-medium": "sd3_medium", "SD3.5-medium": "sd35_medium", "FLUX.1-dev": "flux_dev",
              "SD3-medium + MAGNET (SA-1B)": "sd3_medium_magnet_sa1b", "SD3-medium + MAGNET (COCO)": "sd3_medium_magnet_coco"}


def planned_entries(dry_run_stdout: str, table: str, namespace: str) -> tuple[list[dict], str]:
    """The --entries JSON and --title of the main-table job writing paper_tables/<namespace>/<table>.csv."""
    for command in re.findall(r"seg4diff-repro main-table .*", dry_run_stdout):
        words = shlex.split(command)
        if words[words.index("--csv") + 1] == f"paper_tables/{namespace}/{table}.csv":
            return json.loads(words[words.index("--entries") + 1]), words[words.index("--title") + 1]
    raise AssertionError(f"no main-table job for {table} in the dry run")


@pytest.mark.parametrize("paper_config", [False, True], ids=["toy world", "paper config"])
def test_main_tables_carry_every_column_of_the_papers_tables(tmp_path, paper_config):
    workdir = copy_workflow(tmp_path)
    plan_adapters(workdir)  # the + MAGNET rows' models apply trained adapters
    namespace = "paper" if paper_config else "toy"
    arguments = ["-n", "-p", f"paper_tables/{namespace}/main_table1_ovss.csv",
                 f"paper_tables/{namespace}/main_table2_unsupervised.csv"]
    if paper_config:
        shutil.copytree(REPO / "configs", workdir / "configs")
        arguments += ["--configfile", "config.yaml", "configs/paper.yaml"]
    stdout = snakemake(workdir, *arguments).stdout
    for table, paper in (("main_table1_ovss", TABLE1), ("main_table2_unsupervised", TABLE2)):
        entries, title = planned_entries(stdout, table, namespace)
        models = [name for name in paper if name != "columns"]
        expected = [(model, column) for model in models for column in paper["columns"]]
        assert [(entry["role_model"], entry["role_dataset"]) for entry in entries] == expected
        assert [(entry["paper_model"], entry["paper_dataset"]) for entry in entries] == [
            (MODEL_KEYS[model], KEYS[column]) for model, column in expected
        ]
        # The + MAGNET rows: the variants of the sd3 role's model, read at its layer.
        magnet = [entry for entry in entries if "MAGNET" in entry["role_model"]]
        prefix = "sd3_medium" if paper_config else "toy_sd3"
        assert {entry["path"].split("/")[2] for entry in magnet} == {f"{prefix}_magnet_sa1b", f"{prefix}_magnet_coco"}
        assert {entry["layer"] for entry in magnet} == {e["layer"] for e in entries if e["role_model"] == "SD3-medium"}
        for entry in entries:
            # What stands in for each paper dataset is named in the title.
            assert f"{entry['path'].split('/')[3]} for {entry['role_dataset']}" in title
        if paper_config:
            assert {entry["path"].split("/")[3] for entry in entries} >= {"cityscapes"}
            assert "results/unsupervised/sd3_medium/coco_stuff27/t8/scores.csv" in {e["path"] for e in entries} \
                or table == "main_table1_ovss"
        else:
            assert "toy_scenes for Cityscapes" in title
            assert "toy_stuff for COCO-Stuff-27" in title or table == "main_table1_ovss"


def score_file(folder: Path, model: str, dataset: str, kind: str, miou: float, **settings) -> Path:
    """A per-layer (ovss) or unsupervised score CSV with layers 0-2, the given settings on every row."""
    rows = [{"model": model, "dataset": dataset, "layer": layer, "pACC": 90.0, "mACC": 80.0, "mIoU": miou + layer,
             **settings} for layer in range(3)]
    frame = pd.DataFrame(rows)
    if kind == "unsupervised":
        frame = frame.drop(columns="mACC")
    path = folder / f"{model}_{dataset}.csv"
    frame.to_csv(path, index=False)
    return path


def run_main_table(tmp_path: Path, kind: str, paper: dict, settings_of) -> tuple[pd.DataFrame, str]:
    entries = []
    models = [name for name in paper if name != "columns"]
    for m, model in enumerate(models):
        for c, column in enumerate(paper["columns"]):
            path = score_file(tmp_path, f"ours_{m}", f"set_{c}", kind, 40.0 + c, **settings_of(m, c))
            entries.append({"path": str(path), "layer": 1, "paper_model": MODEL_KEYS[model],
                            "paper_dataset": KEYS[column], "role_model": model, "role_dataset": column})
    out = {ext: tmp_path / f"table.{ext}" for ext in ("csv", "md")}
    main(["main-table", "--kind", kind, "--entries", json.dumps(entries), "--title", "Main Table",
          "--csv", str(out["csv"]), "--markdown", str(out["md"])])
    return pd.read_csv(out["csv"]), out["md"].read_text()


def test_main_table1_rows_carry_their_own_settings_and_the_papers_numbers(tmp_path):
    def settings_of(m: int, c: int) -> dict:
        return {"timestep_k": 8, "num_steps": 50 if m == 2 else 28, "sigma": 0.2317 if m == 2 else 0.51507,
                "prompt": "oracle", "seed": 10 * m + c, "images": 100 + c}

    table, markdown = run_main_table(tmp_path, "ovss", TABLE1, settings_of)
    assert len(table) == 5 * 5
    for index, row in table.iterrows():
        m, c = divmod(index, 5)
        assert (row["model"], row["dataset"]) == (f"ours_{m}", f"set_{c}")
        assert row["seed"] == 10 * m + c and row["images"] == 100 + c  # this row's own source file
        assert row["num_steps"] == (50 if m == 2 else 28) and row["sigma"] == (0.2317 if m == 2 else 0.51507)
        assert row["mIoU"] == pytest.approx(41.0 + c)  # layer 1 of its file
        paper = TABLE1[list(MODEL_KEYS)[m]][c]
        assert row["paper_mIoU"] == paper and row["diff_mIoU"] == pytest.approx(41.0 + c - paper)
    # The paper's layout: one column per paper dataset, each cell "ours / paper".
    layout = markdown.split("## In the paper's layout")[1].split("##")[0]
    for column in TABLE1["columns"]:
        assert f"for {column}" in layout
    assert "ours_0 for SD3-medium" in layout and "45.0 / 26.5" in layout  # SD3, Cityscapes
    assert re.search(r"\| 0\.51507 +\|", markdown) and re.search(r"\| 0\.2317 +\|", markdown)  # σ as recorded


def test_main_table2_states_tau_per_row_and_in_the_title(tmp_path):
    table, markdown = run_main_table(
        tmp_path, "unsupervised", TABLE2, lambda m, c: {"timestep_k": 8, "kl_threshold": 0.01, "geometry": "official"}
    )
    assert len(table) == 4 * 6 and (table["kl_threshold"] == 0.01).all()
    assert markdown.startswith("# Main Table, τ = 0.01\n")
    assert "official code hard-codes 0.1" in markdown
    stuff = table[table["paper_dataset"] == "COCO-Stuff-27"]
    assert stuff["paper_mIoU"].tolist() == [49.7, 47.1, 50.8, 53.5]
    assert "mACC" not in table  # the paper's Table 2 reports mIoU (and we add pACC)


def test_main_table2_shows_the_official_per_row_and_the_corrected_per_image_mIoU(tmp_path):
    def settings_of(m: int, c: int) -> dict:  # the headline mIoU (41 + c at layer 1) is the per-row one
        return {"kl_threshold": 0.1, "matching": "per_row", "mIoU_per_row": 41.0 + c, "mIoU_per_image": 30.5 + c}

    table, markdown = run_main_table(tmp_path, "unsupervised", TABLE2, settings_of)
    assert table["mIoU_per_image"].tolist() == [30.5 + c for _ in range(4) for c in range(6)]
    layout = markdown.split("## In the paper's layout")[1].split("##")[0]
    assert "official per-row matching, corrected per-image matching" in layout
    paper = TABLE2["SD3-medium"][0]
    assert f"41.0 per row, 30.5 per image / {paper:.1f}" in layout  # SD3, the first column
