"""Value-norm tables for paper_tables/: per layer × head (appendix Fig. 15) and per layer (Figs. 6, 9)."""

from __future__ import annotations

import pandas as pd

from seg4diff_repro.attention.value_norms import GROUPS

# What the paper says about the peaks (no numbers are given: the figures are plots only; docs/method.md#value-norms).
PAPER_CLAIMS = {
    "sd3": "layer 9 has distinctly large text-token norms, more so for prompt tokens; "
    "specific heads of layers 7-8 have large image-token norms (Fig. 15)",
    "sd35": "the norms peak at layer 9 (Fig. 6)",
    "flux": "layers 12 and 17 stand out (Fig. 9)",
}


def value_norm_heads_table(per_head: pd.DataFrame) -> pd.DataFrame:
    """One row per (timestep, token group, layer), one column per head, plus the layer's largest head."""
    long = per_head.melt(
        id_vars=["timestep_k", "sigma", "layer", "head"], value_vars=list(GROUPS), var_name="tokens", value_name="norm"
    )
    wide = long.pivot_table(index=["timestep_k", "sigma", "tokens", "layer"], columns="head", values="norm")
    heads = list(wide.columns)
    wide["max_head"] = wide[heads].idxmax(axis=1)
    wide.columns = [f"head_{column}" if isinstance(column, int) else column for column in wide.columns]
    table = wide.reset_index()
    table["tokens"] = pd.Categorical(table["tokens"], categories=list(GROUPS), ordered=True)
    table = table.sort_values(["timestep_k", "tokens", "layer"], ascending=[False, True, True], ignore_index=True)
    table["tokens"] = table["tokens"].astype(str)
    return table


def value_norm_layers_table(per_layer: pd.DataFrame) -> pd.DataFrame:
    """One row per (timestep, layer): the mean norm of the whole value vector per token group, with the
    schedule index and σ that "t = k" landed on."""
    columns = ["timestep_k", "step_index", "sigma", "layer", "block", *GROUPS, "n_prompts"]
    return per_layer[columns].sort_values(["timestep_k", "layer"], ascending=[False, True], ignore_index=True)


def peak_layers(frame: pd.DataFrame) -> str:
    """"t = k: image L, text L, prompt L; …": the layer of the largest mean norm per timestep and token group.

    ``frame`` has one row per (timestep, layer), or per (timestep, layer, head), whose mean is taken.
    """
    per_layer = frame.groupby(["timestep_k", "layer"])[list(GROUPS)].mean().reset_index()
    parts = []
    for k, at_k in sorted(per_layer.groupby("timestep_k"), reverse=True):
        peaks = ", ".join(f"{group} {int(at_k.loc[at_k[group].idxmax(), 'layer'])}" for group in GROUPS)
        parts.append(f"t = {k}: {peaks}")
    return "; ".join(parts)
