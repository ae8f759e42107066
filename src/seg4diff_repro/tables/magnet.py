"""MAGNET's effect: the base model and each of its MAGNET variants (the same weights with a trained LoRA applied)
side by side at the layer the LoRA was supervised on, from the per-layer score files of one run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from seg4diff_repro.atomic import atomic_write_bytes
from seg4diff_repro.tables import heading, markdown_body
from seg4diff_repro.tables.per_layer import METRICS

# Columns of a per-layer score row that are scores, not settings.
_SCORE_PREFIXES = ("mIoU_", "overflow_")
_LORA_COLUMNS = ("lora_run", "lora_protocol", "lora_checkpoint", "lora_iteration", "lora_fingerprint")


def _at_layer(scores: pd.DataFrame, layer: int, what: str) -> pd.Series:
    row = scores[scores["layer"] == layer]
    if row.empty:
        raise ValueError(f"{what}: layer {layer} was not scored (scored layers {sorted(scores['layer'])}): "
                         "re-run its extraction with that layer in attention.layers")
    return row.iloc[0]


def magnet_effect(base: pd.DataFrame, variants: list[tuple[pd.DataFrame, dict]], layer: int) -> pd.DataFrame:
    """One row per model: the base model's per-layer ``scores`` first, then each variant's, each with its pACC,
    mACC and mIoU at the supervised ``layer``, the difference to the base model there (``diff_mIoU``), its best
    layer and best mIoU, the adapter it was scored with and the settings of its score row.

    ``variants``: (per-layer scores, adapter record) pairs; the record is `models.common.adapter_record` of the
    adapter folder, whose fingerprint must be the one the scores carry (``lora_fingerprint``), so that the recipe
    shown is the one that was scored.
    """
    base_row = _at_layer(base, layer, f"base model {base['model'].iloc[0]}")
    rows = []
    for scores, adapter in [(base, None), *variants]:
        model = scores["model"].iloc[0]
        row = _at_layer(scores, layer, f"model {model}")
        if adapter is not None and row.get("lora_fingerprint") != adapter["fingerprint"]:
            raise ValueError(
                f"the scores of {model} were computed with the adapter {row.get('lora_fingerprint')!r}, but "
                f"{adapter['folder']} now holds {adapter['fingerprint']!r}: re-run the scores (snakemake re-extracts "
                "them when the adapter changes)"
            )
        if adapter is None and pd.notna(row.get("lora_run", None)):
            raise ValueError(f"the base model's scores ({model}) were computed with a MAGNET adapter "
                             f"({row['lora_run']}): give the scores of the model without `lora`")
        best = scores.loc[scores["mIoU"].idxmax()]
        settings = row.drop(labels=[c for c in row.index if c in ("model", "layer", *METRICS, *_LORA_COLUMNS)
                                    or c.startswith(_SCORE_PREFIXES)])
        checkpoint = (adapter or {}).get("checkpoint") or {}
        rows.append({
            "model": model, "lora_run": row.get("lora_run"), "lora_protocol": row.get("lora_protocol"),
            "supervised_layer": layer, **{metric: row[metric] for metric in METRICS},
            "diff_mIoU": row["mIoU"] - base_row["mIoU"],
            "best_layer": int(best["layer"]), "best_mIoU": best["mIoU"],
            "lora_checkpoint": checkpoint.get("policy"), "lora_iteration": checkpoint.get("iteration"),
            "lora_fingerprint": row.get("lora_fingerprint"),
            "lora_recipe": None if adapter is None else json.dumps(adapter.get("recipe"), sort_keys=True),
            **settings.to_dict(),
        })
    table = pd.DataFrame(rows)
    table["lora_iteration"] = table["lora_iteration"].astype("Int64")  # the base model's row has none
    return table


def write_magnet_effect(table: pd.DataFrame, title: str, csv_path: Path, md_path: Path) -> None:
    """CSV (full precision, every column) and Markdown: the scores, then each adapter's recipe (its scaling too)."""
    atomic_write_bytes(Path(csv_path), table.to_csv(index=False).encode())
    shown = table.drop(columns=["lora_recipe", "lora_fingerprint"])
    recipes = "\n".join(
        f"- `{row.lora_run}` ({row.lora_protocol}, checkpoint {row.lora_checkpoint} at iteration {row.lora_iteration}, "
        f"adapter {row.lora_fingerprint}): `{row.lora_recipe}`"
        for row in table.itertuples() if isinstance(row.lora_recipe, str)
    )
    note = (
        f"Supervised layer: {int(table['supervised_layer'].iloc[0])}, the layer on which the runs' mask loss "
        "trained the LoRA (magnet.runs.<run>.recipe.layer). pACC, mACC and mIoU in percent at that layer; `diff_mIoU` = variant − "
        "base model there; `best_layer`/`best_mIoU`: each model's best layer over all scored layers. Every variant "
        "is the base model's weights with its run's LoRA applied after loading (the conv head is not used), scored "
        "with the same settings (the columns after `lora_iteration`)."
    )
    atomic_write_bytes(Path(md_path), (
        f"{heading(title, md_path)}{note}\n\n{markdown_body(shown)}\n\n## Adapters (recorded recipe, with its "
        f"scaling from the official one)\n\n{recipes}\n"
    ).encode())
