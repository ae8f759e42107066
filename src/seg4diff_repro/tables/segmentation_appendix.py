"""Tables of the appendix's segmentation targets: Fig. 4's per-head scores and the main paper's
Tables 1 and 2 as reference columns beside ours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.tables.per_layer import METRICS
from seg4diff_repro.tables.sweeps import paper_numbers
from seg4diff_repro.tables import heading


def head_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Layer × head mIoU, with each layer's best head and the head mean."""
    grid = scores.pivot(index="layer", columns="head", values="mIoU")
    table = grid.rename(columns=lambda head: f"head_{head}").reset_index()
    table.insert(1, "model", scores["model"].iloc[0])
    table["best_head"] = grid.idxmax(axis=1).to_numpy()
    table["best_mIoU"] = grid.max(axis=1).to_numpy()
    table["mean_over_heads"] = grid.mean(axis=1).to_numpy()
    return table


def main_table(entries: list[dict], kind: str) -> pd.DataFrame:
    """Our scores at each model's analysis layer beside the paper's main Table 1 (``kind`` "ovss") or
    Table 2 ("unsupervised"), one row per (model, dataset column), each row carrying its own settings.

    Each entry: ``scores`` (the per-layer or unsupervised score table of one model and dataset),
    ``layer``, ``paper_model`` and ``paper_dataset`` (keys of paper_numbers.json; None where the paper has
    no such row/column), ``role_model`` and ``role_dataset`` (the paper's names for what the configured
    ones stand in for). The rows keep the entries' order; every score column besides the metrics (timestep,
    σ, prompt, resize, attention, τ, seed, images, code version, ...) follows ``diff_mIoU``, so that each row
    states the settings that produced it.
    """
    section = {"ovss": "ovss_miou", "unsupervised": "unsupervised_miou"}[kind]
    numbers = paper_numbers()[section]
    metrics = METRICS if kind == "ovss" else ["pACC", "mIoU"]
    rows = []
    for entry in entries:
        scores = entry["scores"]
        row = scores[scores["layer"] == entry["layer"]]
        if row.empty:
            raise ValueError(f"layer {entry['layer']} was not scored for {scores['model'].iloc[0]} on "
                             f"{scores['dataset'].iloc[0]}: scored layers {sorted(scores['layer'])}")
        row = row.iloc[0]
        paper = numbers.get(entry["paper_model"] or "", {}).get("values", {}).get(entry["paper_dataset"] or "")
        settings = row.drop(labels=["model", "dataset", "layer", *METRICS], errors="ignore")
        rows.append({
            "paper_model": entry["role_model"], "paper_dataset": entry["role_dataset"],
            "model": row["model"], "dataset": row["dataset"], "layer": entry["layer"],
            **{m: row[m] for m in metrics}, "paper_mIoU": paper,
            "diff_mIoU": row["mIoU"] - paper if paper is not None else None,
            **settings.to_dict(),
        })
    table = pd.DataFrame(rows)
    table["diff_mIoU"] = table["diff_mIoU"].astype(float)
    return table


def paper_layout(table: pd.DataFrame) -> pd.DataFrame:
    """The main table in the paper's layout: one row per paper model, one column per paper dataset (in the
    order of ``table``), each cell "ours / paper" mIoU; headers name the stand-ins ("toy_sd3 for SD3-medium")."""

    # Where the official behaviour is a bug (per-row matching, unsupervised) both numbers are shown, labelled.
    both = {"mIoU_per_row", "mIoU_per_image"} <= set(table.columns)

    def cell(row: pd.Series) -> str:
        paper = "–" if pd.isna(row["paper_mIoU"]) else f"{row['paper_mIoU']:.1f}"
        if both:
            return f"{row['mIoU_per_row']:.1f} per row, {row['mIoU_per_image']:.1f} per image / {paper}"
        return f"{row['mIoU']:.1f} / {paper}"

    labelled = table.assign(
        row=table["model"] + " for " + table["paper_model"],
        column=table["dataset"] + " for " + table["paper_dataset"],
        cell=table.apply(cell, axis=1),
    )
    wide = labelled.pivot(index="row", columns="column", values="cell")
    wide = wide.loc[list(dict.fromkeys(labelled["row"])), list(dict.fromkeys(labelled["column"]))]
    header = ("model (ours: official per-row matching, corrected per-image matching / paper mIoU, %)" if both
              else "model (ours / paper mIoU, %)")
    return wide.rename_axis(index=header, columns=None).reset_index()


def write_main_table(table: pd.DataFrame, title: str, note: str, csv_path: Path, md_path: Path) -> None:
    """CSV (one row per model and dataset, with its settings) and Markdown: the paper's layout, then every row.

    Scores print with 2 decimals; other numbers with 6 significant digits (σ = 0.515072, τ = 0.01).
    """
    scores = [column for column in table if column in (*METRICS, "paper_mIoU", "diff_mIoU") or column.startswith("mIoU_")]
    shown = table.astype(object).where(table.notna(), None)
    for column in shown:
        two_decimals = column in scores
        shown[column] = [
            "" if value is None else f"{value:.2f}" if two_decimals and isinstance(value, float)
            else f"{value:.6g}" if isinstance(value, float) else str(value)
            for value in shown[column]
        ]
    atomic_write_bytes(Path(csv_path), shown.to_csv(index=False).encode())
    layout = paper_layout(table).to_markdown(index=False)
    atomic_write_bytes(Path(md_path), (
        f"{heading(title, md_path)}{note}\n\n## In the paper's layout\n\n{layout}\n\n"
        f"## Every row with the settings that produced it\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n"
    ).encode())
