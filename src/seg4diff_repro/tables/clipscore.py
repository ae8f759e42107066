"""Main Table 3: CLIPScore of the baseline and the MAGNET-fine-tuned models' generations, beside the paper's.

One row per model (the paper's order: baseline, MAGNET-SA1B, MAGNET-COCO), one column per prompt set
(Pick-a-Pic, COCO, SA-1B) and their mean, each our value next to the paper's and the difference. A prompt
set's value is the mean over its images (every prompt × seed); the mean column averages the sets, as the
paper's does (its 27.1437 is the mean of 27.0252, 26.0638 and 28.3422).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.tables import heading

__all__ = ["PAPER_TABLE3", "PROMPT_SETS", "ROWS", "clipscore_table", "write_clipscore_table"]

# Prompt-set keys (config analyses.generation.clipscore.prompt_sets) -> the paper's column names.
PROMPT_SETS = {"pickapic": "Pick-a-Pic", "coco": "COCO", "sa1b": "SA-1B"}
# Appendix roles -> the paper's row names, in the paper's order.
ROWS = {"sd3": "Baseline", "sd3_magnet_sa1b": "MAGNET-SA1B", "sd3_magnet_coco": "MAGNET-COCO"}
# Main Table 3 of the paper (SD3-medium), as printed.
PAPER_TABLE3 = {
    "sd3": {"pickapic": 27.0252, "coco": 26.0638, "sa1b": 28.3422, "mean": 27.1437},
    "sd3_magnet_sa1b": {"pickapic": 27.0547, "coco": 26.2318, "sa1b": 28.4476, "mean": 27.2447},
    "sd3_magnet_coco": {"pickapic": 27.0409, "coco": 26.2319, "sa1b": 28.5553, "mean": 27.2760},
}


def clipscore_table(scores: pd.DataFrame, roles: dict[str, str]) -> pd.DataFrame:
    """One row per role (``roles``: role → configured model, in ROWS' order): per prompt set the mean CLIPScore
    over its images, the mean over the sets, the paper's numbers and ours minus the paper's, and the images
    counted. A set scored for only some models is refused."""
    sets = [name for name in PROMPT_SETS if name in set(scores["prompt_set"])]
    rows = []
    for role in ROWS:
        model = roles[role]
        own = scores[scores["model"] == model]
        missing = [name for name in sets if name not in set(own["prompt_set"])]
        if own.empty or missing:
            raise ValueError(f"no CLIPScore rows of {model} (appendix role {role})"
                             + (f" for the prompt sets {missing}" if missing and not own.empty else "")
                             + ": re-run score-clipscore with every model's runs")
        row = {"role": role, "row": ROWS[role], "model": model}
        means = own.groupby("prompt_set")["clipscore"].mean()
        for name in sets:
            row[name] = means[name]
            row[f"{name}_images"] = int((own["prompt_set"] == name).sum())
        row["mean"] = float(means[sets].mean())
        for name in (*sets, "mean"):
            row[f"{name}_paper"] = PAPER_TABLE3[role][name]
            row[f"{name}_diff"] = row[name] - PAPER_TABLE3[role][name]
        row["model_fingerprint"] = "; ".join(own["model_fingerprint"].unique())
        rows.append(row)
    return pd.DataFrame(rows)


def write_clipscore_table(table: pd.DataFrame, title: str, notes: list[str], csv_path: Path, md_path: Path) -> None:
    """CSV (every column, 4 decimals) and Markdown (the notes, then ours / paper / difference per column)."""
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False, float_format="%.4f").encode())
    columns = [name for name in (*PROMPT_SETS, "mean") if name in table]
    shown = {"": table["row"], "model": table["model"]}
    for name in columns:
        label = PROMPT_SETS.get(name, "mean")
        shown[label] = table[name].map("{:.4f}".format)
        shown[f"{label} (paper)"] = table[f"{name}_paper"].map("{:.4f}".format)
        shown[f"{label} Δ"] = table[f"{name}_diff"].map("{:+.4f}".format)
    body = pd.DataFrame(shown).to_markdown(index=False)
    atomic_write_bytes(Path(md_path), (heading(title, md_path) + "\n\n".join(notes) + f"\n\n{body}\n").encode())
