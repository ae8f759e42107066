"""Tables of the fidelity scores under single-layer I2T perturbation (appendix Figs. 5, 7, 10).

One row per run (the unperturbed reference, then each perturbed layer): mean ± std over prompts of
CLIP-I, CLIP-T and DINO (a prompt's seeds are averaged first), with the backbones, the scale of the run and the
code that scored it (version, code fingerprint, commit).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.tables import heading

__all__ = [
    "METRICS", "METRIC_NAMES", "ROLE_NAMES", "fidelity_table", "model_label", "run_scale", "write_fidelity_table",
]

METRIC_NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}
METRICS = tuple(METRIC_NAMES)
# What made a run's scores: the generating model's fingerprint (from the run's manifest), the backbones and the
# scoring code.
PROVENANCE_COLUMNS = ("model_fingerprint", "clip_backbone", "dino_backbone", "fidelity_weights", "clip_fingerprint",
                      "dino_fingerprint", "code_version")
# The paper's model of each appendix role, and the `paper_name` a configured model has when it is that model.
ROLE_NAMES = {"sd3": "SD3-medium", "sd35": "SD3.5-medium", "flux": "FLUX.1-dev"}
ROLE_PAPER_NAMES = {"sd3": "sd3_medium", "sd35": "sd35_medium", "flux": "flux_dev"}


def model_label(model: str, paper_name: str | None, role: str) -> str:
    """'sd3_medium (SD3-medium)' for the paper's model, else e.g. 'toy_sd3 standing in for SD3-medium'."""
    if paper_name == ROLE_PAPER_NAMES[role]:
        return f"{model} ({ROLE_NAMES[role]})"
    return f"{model} standing in for {ROLE_NAMES[role]}"


def run_scale(manifest: dict) -> str:
    """'4 prompts x 1 seed (0), 64x64 px, 28 steps, CFG 7.5' from a generation run's manifest."""
    run, sampling = manifest["run"], manifest["sampling"]
    seeds = run["seeds"]
    guidance = (f"distilled guidance {sampling['distilled_guidance']:g}" if run["backbone"] == "flux"
                else f"CFG {sampling['cfg']:g}")
    return (f"{manifest['n_prompts']} prompts x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
            f"({', '.join(map(str, seeds))}), {manifest['width']}x{manifest['height']} px, "
            f"{sampling['steps']} steps, {guidance}")


def fidelity_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over prompts per run; the unperturbed run first, then the layers in order. Each row keeps the
    generating model's fingerprint, the backbones and the code (``code_version``: version, fingerprint, commit)
    that scored its run."""
    missing = [column for column in PROVENANCE_COLUMNS if column not in scores]
    if missing:
        raise ValueError(f"the fidelity scores have no {', '.join(missing)} column (made before scores recorded "
                         "them): re-run score-fidelity")
    per_prompt = scores.groupby(["run", "prompt_index"], sort=False)[list(METRICS)].mean().reset_index()
    stats = per_prompt.groupby("run", sort=False)[list(METRICS)].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    runs = scores.drop_duplicates("run").set_index("run")
    table = stats.join(runs[["model", "layer", *PROVENANCE_COLUMNS]])
    table["n_prompts"] = per_prompt.groupby("run", sort=False)["prompt_index"].nunique()
    table["n_images"] = scores.groupby("run", sort=False).size()
    table = table.reset_index()
    table["layer"] = table["layer"].astype("Int64")  # empty for the unperturbed reference
    table = table.sort_values("layer", na_position="first", ignore_index=True)
    columns = ["model", "run", "layer", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "n_prompts",
               "n_images", *PROVENANCE_COLUMNS]
    return table[columns]


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"  # one prompt has no std


def write_fidelity_table(table: pd.DataFrame, title: str, notes: list[str], csv_path: Path, md_path: Path) -> None:
    """CSV (4 decimals) and Markdown (the notes, then mean ± std per metric)."""
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False, float_format="%.4f").encode())
    shown = pd.DataFrame({
        "run": table["run"],
        "layer": table["layer"].astype(object).where(table["layer"].notna(), "unperturbed"),
        **{METRIC_NAMES[m]: [_mean_std(mean, std) for mean, std in zip(table[f"{m}_mean"], table[f"{m}_std"])]
           for m in METRICS},
        "prompts": table["n_prompts"],
        "images": table["n_images"],
    })
    body = shown.to_markdown(index=False)
    text = heading(title, md_path) + "\n\n".join(notes) + f"\n\n{body}\n"
    atomic_write_bytes(Path(md_path), text.encode())
