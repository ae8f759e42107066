# Settings and helpers of the attention figures from generation (workflow/rules/attention_figures.smk).

from types import SimpleNamespace


ATTENTION_FIGURES = config["analyses"]["attention_figures"]
# Per-layer value-norm figures: file stem -> (appendix role, appendix figure number).
VALUE_NORM_LAYER_FIGURES = {"fig06_value_norms_sd35": ("sd35", 6), "fig09_value_norms_flux": ("flux", 9)}
# Token-map figures of the sd3 role: file stem -> `token-maps-figure --figure`.
TOKEN_MAP_FIGURES = {
    "fig03_i2t_t2i_sd3": "fig03",
    "fig12_token_maps_sd3": "fig12",
    "fig13_head_maps_sd3": "fig13",
    "fig14_head_maps_sd3": "fig14",
    "fig17_null_token_maps_sd3": "fig17",
}


def generation_model_settings(name, role=None):
    """JSON of configured model `name` (standing in for `role`) as the attention-figure commands read it."""
    model = config["models"][name]
    settings = {
        "model": name,
        "backbone": model["backbone"],
        "source": model["source"],
        "revision": model["revision"],
        "dtype": model["dtype"],
        "options": model["options"],
        "num_steps": model["num_inference_steps"],
        "analysis_layer": model["analysis_layer"],
        "toy": model["toy"],
    }
    return json.dumps(settings | ({"role": role} if role else {}), sort_keys=True)


def role_model_inputs(role):
    """`model_inputs` of the model standing in for `role` (for rules whose files are named by the role)."""
    return model_inputs(SimpleNamespace(model=appendix_model(role)))


def value_norm_layers_input(wildcards):
    """The per-layer value norms of the model standing in for the figure's role."""
    return f"results/value_norms/{appendix_model(VALUE_NORM_LAYER_FIGURES[wildcards.stem][0])}/per_layer.csv"


def uses_gpu(name):
    """1 if configured model `name` runs on CUDA: the `gpu` resource that keeps GPU jobs from overlapping."""
    return int(config["models"][name]["device"].startswith("cuda"))


def device_of(name):
    """The torch device of configured model `name`: a resource of the rule (operational, re-runs nothing)."""
    return config["models"][name]["device"]


def attention_figure_targets():
    """Every attention-figure target of the appendix (Figs. 3, 6, 9, 12-17)."""
    tables = ["fig15_value_norms_heads_sd3", *VALUE_NORM_LAYER_FIGURES]
    figures = [*tables, "fig16_pca_qkv_sd3", *TOKEN_MAP_FIGURES]
    return [f"{TABLES}/{stem}.{ext}" for stem in tables for ext in ("csv", "md")] + [
        f"{FIGURES}/{stem}.{ext}" for stem in figures for ext in ("png", "pdf")
    ]
