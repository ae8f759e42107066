"""Tables of the appendix's segmentation targets: Fig. 4's per-head scores and the main paper's
Tables 1 and 2 as reference columns beside ours."""

from __future__ import annotations

import pandas as pd

from seg4diff_repro.tables.per_layer import METRICS
from seg4diff_repro.tables.sweeps import paper_numbers


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
    Table 2 ("unsupervised").

    Each entry: ``scores`` (the per-layer or unsupervised score table of one model and dataset),
    ``layer``, ``paper_model`` and ``paper_dataset`` (None where the paper has no such row/column),
    ``role_model`` and ``role_dataset`` (the paper's names for what the configured ones stand in for).
    """
    section = {"ovss": "ovss_miou", "unsupervised": "unsupervised_miou"}[kind]
    numbers = paper_numbers()[section]
    rows = []
    for entry in entries:
        scores = entry["scores"]
        row = scores[scores["layer"] == entry["layer"]]
        if row.empty:
            raise ValueError(f"layer {entry['layer']} was not scored for {scores['model'].iloc[0]} on "
                             f"{scores['dataset'].iloc[0]}: scored layers {sorted(scores['layer'])}")
        row = row.iloc[0]
        paper = numbers.get(entry["paper_model"] or "", {}).get("values", {}).get(entry["paper_dataset"] or "")
        metrics = METRICS if kind == "ovss" else ["pACC", "mIoU"]
        rows.append({
            "paper_model": entry["role_model"], "paper_dataset": entry["role_dataset"],
            "model": row["model"], "dataset": row["dataset"], "layer": entry["layer"],
            "timestep_k": int(row["timestep_k"]), **{m: row[m] for m in metrics},
            "paper_mIoU": paper,
        })
    table = pd.DataFrame(rows)
    table["diff_mIoU"] = table["mIoU"] - table["paper_mIoU"].astype(float)
    return table
