"""The per-layer segmentation table (CSV and Markdown) with the paper's value where it reports one."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pandas as pd

from seg4diff_repro.datasets.layout import atomic_write_bytes
from seg4diff_repro.tables import heading, markdown_body

METRICS = ["pACC", "mACC", "mIoU"]
# Prompts past the 77-token window (issue 11 item 5): both rules' mIoU, labelled, beside the headline one.
OVERFLOW_COLUMNS = {
    "mIoU_overflow_official": "mIoU (official, >75-token prompts: NaN maps win)",
    "mIoU_overflow_corrected": "mIoU (corrected, >75-token prompts)",
}
# The protocol choices every segmentation table records (scores CSV columns).
PROTOCOL = ("prompt", "prompt_classes_from", "background", "prompt_overflow", "overflow_images", "overflow_classes")


def overflow_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """Both overflow rules' mIoU under their labels, where some image's prompt passed the window; else no column."""
    if int(rows["overflow_images"].max()) == 0:
        return pd.DataFrame(index=rows.index)
    return rows[list(OVERFLOW_COLUMNS)].rename(columns=OVERFLOW_COLUMNS)


def paper_ovss_miou(paper_model: str | None, paper_dataset: str | None, layer: int, timestep_k: int) -> float | None:
    """The paper's mIoU for this (model, dataset, layer, timestep), or None where it reports none."""
    if paper_model is None or paper_dataset is None:
        return None
    numbers = json.loads(files("seg4diff_repro.data").joinpath("paper_numbers.json").read_text())["ovss_miou"]
    entry = numbers.get(paper_model)
    if entry is None or entry["layer"] != layer or entry["timestep_k"] != timestep_k:
        return None
    return entry["values"].get(paper_dataset)


def per_layer_table(scores: pd.DataFrame, paper_model: str | None, paper_dataset: str | None) -> pd.DataFrame:
    table = pd.concat([scores[["model", "dataset", "layer", *METRICS]], overflow_columns(scores)], axis=1)
    table["paper_mIoU"] = [
        paper_ovss_miou(paper_model, paper_dataset, int(row.layer), int(row.timestep_k))
        for row in scores.itertuples()
    ]
    table["diff_mIoU"] = table["mIoU"] - table["paper_mIoU"].astype(float)
    return table


def write_per_layer_table(
    scores: pd.DataFrame, paper_model: str | None, paper_dataset: str | None, csv_path: Path, md_path: Path
) -> pd.DataFrame:
    """Write the table as CSV and as Markdown headed by the settings that produced it."""
    table = per_layer_table(scores, paper_model, paper_dataset)
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False, float_format="%.2f").encode())
    first = scores.iloc[0]
    provenance = ", ".join(
        f"{key} = {first[key]}"
        for key in ("model", "dataset", "timestep_k", "num_steps", "sigma", *PROTOCOL, "resize", "attention",
                    "norm_before_merge", "norm_after_merge", "seed", "images", "code_version")
    )
    markdown = (
        heading(f"Per-layer open-vocabulary segmentation: {first['model']} on {first['dataset']}", md_path)
        + f"{provenance}.\n\nScores in percent; `paper_mIoU` is empty where the paper reports no number.\n\n"
        + markdown_body(table)
        + "\n"
    )
    atomic_write_bytes(Path(md_path), markdown.encode())
    return table
