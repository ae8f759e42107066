"""The toy world's check: does the trained toy model have an interior grounding layer that the random control lacks,
and does unsupervised merging split its images into several proposals?"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seg4diff_repro.datasets.layout import atomic_write_bytes
from seg4diff_repro.provenance import provenance, provenance_label
from seg4diff_repro.tables import heading

# The toy world's acceptance thresholds (issue 16): mIoU points, and proposals per image.
MIN_GAIN_OVER_CONTROL = 25.0
MIN_BEST_MINUS_MEDIAN = 15.0
MIN_MEAN_PROPOSALS = 1.0  # strictly more than this


def _check(name: str, value: float, threshold: float, passed: bool, relation: str = ">=") -> str:
    return f"{name} {value:.2f} {relation if passed else 'not ' + relation} {threshold:g}: {'pass' if passed else 'FAIL'}"


def grounding_summary(
    trained: pd.DataFrame, control: pd.DataFrame, unsupervised: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Best layer, best and median mIoU of each model, and the checks on the trained one: its best layer is an
    interior one (neither the first nor the last block), at least MIN_BEST_MINUS_MEDIAN above its median layer and
    MIN_GAIN_OVER_CONTROL above the control's best layer; with ``unsupervised`` (the trained model's unsupervised
    scores), more than MIN_MEAN_PROPOSALS proposals per image on average over its rows."""
    rows = []
    for table in (trained, control):
        best = table.loc[table["mIoU"].idxmax()]
        rows.append({
            "model": best["model"], "best_layer": int(best["layer"]), "layers": len(table),
            "best_mIoU": float(best["mIoU"]), "median_mIoU": float(table["mIoU"].median()),
        })
    summary = pd.DataFrame(rows)
    gain = summary.loc[0, "best_mIoU"] - summary.loc[1, "best_mIoU"]
    spread = summary.loc[0, "best_mIoU"] - summary.loc[0, "median_mIoU"]
    best_layer, n_layers = summary.loc[0, "best_layer"], int(trained["layer"].max()) + 1
    summary["best_minus_control_best"] = [gain, None]
    summary["best_minus_median"] = [spread, summary.loc[1, "best_mIoU"] - summary.loc[1, "median_mIoU"]]
    checks = [
        f"best layer {best_layer} of 0..{n_layers - 1} interior: "
        f"{'pass' if 0 < best_layer < n_layers - 1 else 'FAIL'}",
        _check("best - control best", gain, MIN_GAIN_OVER_CONTROL, gain >= MIN_GAIN_OVER_CONTROL),
        _check("best - median", spread, MIN_BEST_MINUS_MEDIAN, spread >= MIN_BEST_MINUS_MEDIAN),
    ]
    summary["mean_proposals"] = None
    if unsupervised is not None:
        proposals = float(unsupervised["mean_proposals"].mean())
        summary["mean_proposals"] = [proposals, None]
        taus = ", ".join(f"{tau:g}" for tau in sorted(unsupervised["kl_threshold"].unique()))
        layers = ", ".join(str(layer) for layer in sorted(unsupervised["layer"].unique()))
        checks.append(_check(f"proposals per image (tau {taus}, {unsupervised['dataset'].iloc[0]}, layer {layers})",
                             proposals, MIN_MEAN_PROPOSALS, proposals > MIN_MEAN_PROPOSALS, ">"))
    summary["checks"] = ["; ".join(checks), "control"]
    return summary


def write_grounding_summary(
    trained_csv: Path, control_csv: Path, csv_path: Path, md_path: Path, unsupervised_csv: Path | None = None
) -> pd.DataFrame:
    """The summary as CSV and Markdown, each recording the code that made it (version, fingerprint, commit)."""
    unsupervised = None if unsupervised_csv is None else pd.read_csv(unsupervised_csv)
    summary = grounding_summary(pd.read_csv(trained_csv), pd.read_csv(control_csv), unsupervised)
    # The per-layer tables it reads carry no code column; the whole package's fingerprint covers their scoring.
    summary["code_version"] = provenance_label(provenance())
    atomic_write_bytes(Path(csv_path), summary.to_csv(index=False, float_format="%.2f").encode())
    unsupervised_note = "" if unsupervised_csv is None else (
        f" Proposals: the trained model's unsupervised scores, {Path(unsupervised_csv).parent.parent.name} "
        f"({unsupervised_csv}).")
    markdown = (
        heading("Toy world: grounding layer of the trained toy model vs the random-weight control", md_path)
        + f"From {Path(trained_csv).name} and {Path(control_csv).name} (the val set of "
        f"{pd.read_csv(trained_csv)['dataset'].iloc[0]}, oracle prompt, head-mean post-softmax I2T; the timestep "
        f"sweep's row for this timestep reads the same per-layer scores).{unsupervised_note} The toy world's "
        "acceptance: the best layer an interior one, at least "
        f"{MIN_GAIN_OVER_CONTROL:g} mIoU points above the control's best and at least {MIN_BEST_MINUS_MEDIAN:g} "
        f"points above its own median layer; unsupervised merging more than {MIN_MEAN_PROPOSALS:g} proposal per "
        f"image. Code: seg4diff-repro {summary['code_version'].iloc[0]}.\n\n"
        + summary.drop(columns="code_version").astype(object).where(summary.notna(), None)
        .to_markdown(index=False, floatfmt=".2f", missingval="")
        + "\n"
    )
    atomic_write_bytes(Path(md_path), markdown.encode())
    return summary
