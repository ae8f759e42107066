"""The toy world's check: does the trained toy model have a grounding layer that the random control lacks?"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seg4diff_repro.datasets.layout import atomic_write_bytes
from seg4diff_repro.provenance import provenance, provenance_label
from seg4diff_repro.tables import heading

# The toy-world issue's acceptance thresholds, in mIoU points.
MIN_GAIN_OVER_CONTROL = 20.0
MIN_BEST_MINUS_MEDIAN = 10.0


def grounding_summary(trained: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """Best layer, best and median mIoU of each model, and the two checks on the trained one."""
    rows = []
    for table in (trained, control):
        best = table.loc[table["mIoU"].idxmax()]
        rows.append({
            "model": best["model"], "best_layer": int(best["layer"]), "best_mIoU": float(best["mIoU"]),
            "median_mIoU": float(table["mIoU"].median()),
        })
    summary = pd.DataFrame(rows)
    gain = summary.loc[0, "best_mIoU"] - summary.loc[1, "best_mIoU"]
    spread = summary.loc[0, "best_mIoU"] - summary.loc[0, "median_mIoU"]
    summary["best_minus_control_best"] = [gain, None]
    summary["best_minus_median"] = [spread, summary.loc[1, "best_mIoU"] - summary.loc[1, "median_mIoU"]]
    summary["checks"] = [
        f"gain over control {gain:.1f} {'>=' if gain >= MIN_GAIN_OVER_CONTROL else '<'} {MIN_GAIN_OVER_CONTROL:g}; "
        f"best - median {spread:.1f} {'>=' if spread >= MIN_BEST_MINUS_MEDIAN else '<'} {MIN_BEST_MINUS_MEDIAN:g}",
        "control",
    ]
    return summary


def write_grounding_summary(trained_csv: Path, control_csv: Path, csv_path: Path, md_path: Path) -> pd.DataFrame:
    """The summary as CSV and Markdown, each recording the code that made it (version, fingerprint, commit)."""
    summary = grounding_summary(pd.read_csv(trained_csv), pd.read_csv(control_csv))
    # The per-layer tables it reads carry no code column; the whole package's fingerprint covers their scoring.
    summary["code_version"] = provenance_label(provenance())
    atomic_write_bytes(Path(csv_path), summary.to_csv(index=False, float_format="%.2f").encode())
    markdown = (
        heading("Toy world: grounding layer of the trained toy model vs the random-weight control", md_path)
        + f"From {Path(trained_csv).name} and {Path(control_csv).name} (toy-shapes val, oracle prompt, "
        "t = 8 of 28, head-mean post-softmax I2T). The toy world's acceptance: best layer at least "
        f"{MIN_GAIN_OVER_CONTROL:g} mIoU points above the control's best, and at least {MIN_BEST_MINUS_MEDIAN:g} "
        f"points above its own median layer. Code: seg4diff-repro {summary['code_version'].iloc[0]}.\n\n"
        + summary.drop(columns="code_version").astype(object).where(summary.notna(), None)
        .to_markdown(index=False, floatfmt=".2f", missingval="")
        + "\n"
    )
    atomic_write_bytes(Path(md_path), markdown.encode())
    return summary
