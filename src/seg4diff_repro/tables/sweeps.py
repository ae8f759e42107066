"""Tables of the segmentation sweeps: over timesteps (appendix Fig. 2) and over score normalisation (appendix Table 1)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pandas as pd

from seg4diff_repro.datasets.layout import atomic_write_bytes
from seg4diff_repro.tables.per_layer import METRICS, PROTOCOL, overflow_columns, paper_ovss_miou
from seg4diff_repro.tables import heading, markdown_body

PROVENANCE = (
    "model", "dataset", *PROTOCOL, "matching", "scored_classes", "resize", "attention", "seed", "images",
    "model_fingerprint", "code_version",
)
# Unsupervised Hungarian matching (issue 11 item 4): both, labelled, beside the headline `mIoU` (the config's).
MATCHING_COLUMNS = {
    "mIoU_per_row": "mIoU (official, per-row matching)",
    "mIoU_per_image": "mIoU (corrected, per-image)",
}


def paper_numbers() -> dict:
    return json.loads(files("seg4diff_repro.data").joinpath("paper_numbers.json").read_text())


def timestep_sweep_table(
    per_layer_scores: list[pd.DataFrame], layer: int, paper_model: str | None, paper_dataset: str | None
) -> pd.DataFrame:
    """One row per timestep k: the scores of ``layer``, with the paper's mIoU where it gives one (k = 8)."""
    rows = []
    for scores in per_layer_scores:
        row = scores[scores["layer"] == layer]
        if row.empty:
            raise ValueError(f"layer {layer} was not recorded at t = {int(scores['timestep_k'].iloc[0])}: "
                             f"recorded layers {sorted(scores['layer'])}")
        row = row.iloc[0]
        rows.append({
            "model": row["model"], "dataset": row["dataset"], "layer": layer, "timestep_k": int(row["timestep_k"]),
            "sigma": row["sigma"], **{m: row[m] for m in METRICS},
            **overflow_columns(scores[scores["layer"] == layer]).iloc[0].to_dict(),
            "paper_mIoU": paper_ovss_miou(paper_model, paper_dataset, layer, int(row["timestep_k"])),
        })
    table = pd.DataFrame(rows).sort_values("timestep_k", ignore_index=True)
    table["best_k"] = int(table.loc[table["mIoU"].idxmax(), "timestep_k"])
    table["paper_best_k"] = paper_numbers()["timestep_sweep"]["best_k"]
    return table


def normalisation_table(
    variants: dict[tuple[bool, bool], pd.DataFrame], layer: int, paper_model: str | None, paper_dataset: str | None
) -> pd.DataFrame:
    """One row per (post-softmax?, min-max?) combination at ``layer``, beside appendix Table 1."""
    paper_rows = []
    entry = paper_numbers()["normalisation"].get(paper_model or "")
    if entry is not None and entry["layer"] == layer:
        paper_rows = entry["rows"]
    rows = []
    for (softmax, minmax), scores in sorted(variants.items(), key=lambda item: item[0]):
        row = scores[scores["layer"] == layer].iloc[0]
        paper = next((r.get(paper_dataset or "") for r in paper_rows
                      if r["softmax"] == softmax and r["minmax"] == minmax), None)
        rows.append({
            "model": row["model"], "dataset": row["dataset"], "layer": layer, "timestep_k": int(row["timestep_k"]),
            "post_softmax": softmax, "min_max": minmax, **{m: row[m] for m in METRICS},
            **overflow_columns(scores[scores["layer"] == layer]).iloc[0].to_dict(), "paper_mIoU": paper,
        })
    table = pd.DataFrame(rows)
    table["diff_mIoU"] = table["mIoU"] - table["paper_mIoU"].astype(float)
    return table


def settings_line(provenance: pd.Series) -> str:
    """The settings a score file records (``PROVENANCE``), as one line: "model = ..., background = drop, ..."."""
    return ", ".join(f"{key} = {provenance[key]}" for key in PROVENANCE if key in provenance)


def write_table(table: pd.DataFrame, provenance: pd.Series, title: str, note: str, csv_path: Path, md_path: Path) -> None:
    """CSV and Markdown (headed by the settings that produced the numbers)."""
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False, float_format="%.2f").encode())
    markdown = f"{heading(title, md_path)}{settings_line(provenance)}.\n\n{note}\n\n{markdown_body(table)}\n"
    atomic_write_bytes(Path(md_path), markdown.encode())


def write_panel_table(
    panels: list[tuple[str, pd.DataFrame, pd.Series]], title: str, note: str, csv_path: Path, md_path: Path
) -> pd.DataFrame:
    """Panels of several score files in one table (appendix Fig. 2, Table 1), each with its own settings.

    ``panels``: (label, rows, provenance) per panel, ``provenance`` the settings row of the panel's own raw
    scores. As in the main tables, every CSV row carries its ``panel`` and the settings that produced it (the
    ``PROVENANCE`` keys its rows lack); the Markdown states each panel's settings on a line of its own, led by
    the label that the rows' ``panel`` column repeats. Returns the CSV's table.
    """
    parts = []
    for label, rows, provenance in panels:
        for key in ("model", "dataset"):
            if key in provenance and set(rows[key]) != {provenance[key]}:
                raise ValueError(
                    f"panel {label!r}: its rows are {key} {sorted(set(rows[key]))} but its settings come from "
                    f"{key} {provenance[key]!r}; give each panel its own score file, in the order of the panels"
                )
        settings = {key: provenance[key] for key in PROVENANCE if key in provenance and key not in rows}
        parts.append(rows.assign(panel=label, **settings))
    table = pd.concat(parts, ignore_index=True)
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False, float_format="%.2f").encode())
    shown = pd.concat([rows.assign(panel=label) for label, rows, _ in panels], ignore_index=True)
    settings = "\n\n".join(f"**{label}**: {settings_line(provenance)}." for label, _, provenance in panels)
    atomic_write_bytes(Path(md_path), (
        f"{heading(title, md_path)}Settings of each panel (the rows whose `panel` column names it):\n\n"
        f"{settings}\n\n{note}\n\n{markdown_body(shown)}\n"
    ).encode())
    return table


def unsupervised_table(scores: pd.DataFrame, layer: int, paper_model: str | None, paper_dataset: str | None) -> pd.DataFrame:
    """The unsupervised scores of ``layer``, beside the paper's Table 2 value where it has one."""
    row = scores[scores["layer"] == layer]
    if row.empty:
        raise ValueError(f"layer {layer} was not recorded: recorded layers {sorted(scores['layer'])}")
    table = row[["model", "dataset", "layer", "timestep_k", "kl_threshold", "geometry", "background", "scored_classes",
                 "mean_proposals", "matching", "pACC", "mIoU", *MATCHING_COLUMNS]].rename(columns=MATCHING_COLUMNS)
    entry = paper_numbers()["unsupervised_miou"].get(paper_model or "")
    paper = None
    if entry is not None and entry["layer"] == layer and entry["timestep_k"] == int(table["timestep_k"].iloc[0]):
        paper = entry["values"].get(paper_dataset or "")
    table["paper_mIoU"] = paper
    table["diff_mIoU"] = table["mIoU"] - table["paper_mIoU"].astype(float)
    return table.reset_index(drop=True)
