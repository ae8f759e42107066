# Names and helpers of the appendix targets (figures/figNN_*, paper_tables/tabNN_*, main_table*): which paper
# figure each is, and which configured model and dataset stand in for the paper's (`appendix:` in the config).
# `snakemake all_segmentation` builds them all; each file is also a target of its own.

PAPER_MODELS = {"sd3": "SD3-medium", "sd35": "SD3.5-medium", "flux": "FLUX.1-dev",
                "sd3_magnet_sa1b": "SD3-medium + MAGNET (SA-1B)", "sd3_magnet_coco": "SD3-medium + MAGNET (COCO)"}
PAPER_DATASETS = {
    "voc20": "VOC20",
    "voc21": "VOC21 (with background)",
    "coco_object": "COCO-Object",
    "coco_object_bg": "COCO-Object (with background)",
    "pc59": "PC59",
    "pc59_bg": "PC59 (with background)",
    "ade150": "ADE20K-150",
    "coco_stuff27": "COCO-Stuff-27",
    "cityscapes": "Cityscapes",
}
# Keys of paper_numbers.json for each dataset role (the unsupervised COCO-Object and PC59 columns include background).
PAPER_DATASET_KEYS = {"coco_object_bg": "coco_object", "pc59_bg": "pc59"}
PAPER_MODEL_KEYS = {"sd3": "sd3_medium", "sd35": "sd35_medium", "flux": "flux_dev",
                    "sd3_magnet_sa1b": "sd3_medium_magnet_sa1b", "sd3_magnet_coco": "sd3_medium_magnet_coco"}
# The paper's "+ MAGNET" rows follow the models they fine-tune, each where `appendix.models` names a variant.
MAGNET_ROLES = ["sd3_magnet_sa1b", "sd3_magnet_coco"]

PER_LAYER_FIGURES = {
    "main_fig08_per_layer_sd3": ("sd3", "voc20", "Main Fig. 8"),
    "fig08_per_layer_sd35": ("sd35", "voc20", "Appendix Fig. 8"),
    "fig11_per_layer_flux": ("flux", "voc20", "Appendix Fig. 11"),
}
OVERLAY_FIGURES = {
    "fig21_ovss_coco_object": ("ovss", "coco_object", "Appendix Fig. 21"),
    "fig22_ovss_pc59": ("ovss", "pc59", "Appendix Fig. 22"),
    "fig23_ovss_ade150": ("ovss", "ade150", "Appendix Fig. 23"),
    "fig24_unsupervised_coco_object": ("unsupervised", "coco_object_bg", "Appendix Fig. 24"),
    "fig25_unsupervised_voc21": ("unsupervised", "voc21", "Appendix Fig. 25"),
    "fig26_unsupervised_ade150": ("unsupervised", "ade150", "Appendix Fig. 26"),
}
# Main tables: (kind, model rows, dataset columns in the paper's order: every column of its table).
MAIN_TABLES = {
    "main_table1_ovss": (
        "ovss",
        ["sd3", "sd35", "flux", *MAGNET_ROLES],
        ["voc20", "coco_object", "pc59", "ade150", "cityscapes"],
    ),
    "main_table2_unsupervised": (
        "unsupervised",
        ["sd3", "sd35", *MAGNET_ROLES],
        ["voc21", "pc59_bg", "coco_object_bg", "coco_stuff27", "cityscapes", "ade150"],
    ),
}
TIMESTEP = config["attention"]["timestep"]


def paper_dataset_key(role):
    return PAPER_DATASET_KEYS.get(role, role)


def stand_in(model_role=None, dataset_role=None):
    """'toy_sd3 for SD3-medium on toy_objects for VOC20': what the output shows in place of the paper's."""
    parts = []
    if model_role:
        parts.append(f"{appendix_model(model_role)} for {PAPER_MODELS[model_role]}")
    if dataset_role:
        parts.append(f"{appendix_dataset(dataset_role)} for {PAPER_DATASETS[dataset_role]}")
    return " on ".join(parts)


def segmentation_appendix_targets():
    stems = ["tab01_normalisation", "main_table1_ovss", "main_table2_unsupervised"]
    figures = ["fig04_head_miou", *PER_LAYER_FIGURES]
    if config["analyses"]["timestep_sweep"]["timesteps"]:
        figures.append("fig02_timestep")
    tables = [f"{TABLES}/{stem}.{ext}" for stem in stems + figures for ext in ("csv", "md")]
    images = [f"{FIGURES}/{stem}.{ext}" for stem in figures + list(OVERLAY_FIGURES) for ext in ("png", "pdf")]
    return tables + images


def per_layer_figure_model(figure):
    """The config entry of the model standing in for a per-layer figure's paper model."""
    return config["models"][appendix_model(PER_LAYER_FIGURES[figure][0])]


def provenance_scores(roles):
    """Raw scores of SD3's stand-in on each role's dataset: each panel's settings in a combined table."""
    return [
        f"results/segmentation/{appendix_model('sd3')}/{appendix_dataset(role)}/t{TIMESTEP}/per_layer.csv"
        for role in roles
    ]


def overlay_cache(wildcards):
    mode, role, _ = OVERLAY_FIGURES[wildcards.figure]
    if mode == "ovss":
        return attention_manifest(appendix_model("sd3"), appendix_dataset(role), TIMESTEP)
    return f"results/attention_null/{appendix_model('sd3')}/{appendix_dataset(role)}/t{TIMESTEP}/manifest.json"


def overlay_dataset_root(wildcards):
    dataset = config["datasets"][appendix_dataset(OVERLAY_FIGURES[wildcards.figure][1])]
    return DATA_ROOT / "prepared" / dataset["prepared"]


def main_table_model_roles(name):
    """The model rows of a main table: its roles, less a MAGNET role the config leaves null (appendix.models)."""
    return [role for role in MAIN_TABLES[name][1] if appendix_model(role) is not None]


def main_table_title(name):
    """'Main Table 1: open-vocabulary segmentation (mIoU, background excluded), ..., stand-ins ...'."""
    kind, _, dataset_roles = MAIN_TABLES[name]
    what = {
        "ovss": "open-vocabulary segmentation (mIoU %, background excluded, oracle prompt)",
        "unsupervised": "unsupervised segmentation (mIoU %, background included, empty prompt)",
    }[kind]
    models = "; ".join(stand_in(role) for role in main_table_model_roles(name))
    datasets = "; ".join(stand_in(None, role) for role in dataset_roles)
    magnet = (
        " MAGNET rows: the sd3 row's model with the trained LoRA applied after loading, scored at the sd3 model's "
        "layer with the same settings." if any(role in MAGNET_ROLES for role in main_table_model_roles(name)) else ""
    )
    return (
        f"Main Table {name[len('main_table')]}: {what}, t = {TIMESTEP} (index N − {TIMESTEP} of each model's "
        f"N-step schedule), each model's analysis layer. Models: {models}. Datasets: {datasets}.{magnet}"
    )


def main_table_entries(name):
    kind, _, dataset_roles = MAIN_TABLES[name]
    pattern = (
        "results/segmentation/{model}/{dataset}/t{timestep}/per_layer.csv"
        if kind == "ovss"
        else "results/unsupervised/{model}/{dataset}/t{timestep}/scores.csv"
    )
    return [
        {
            "path": pattern.format(model=appendix_model(m), dataset=appendix_dataset(d), timestep=TIMESTEP),
            # A MAGNET row is scored exactly as the SD3 row it fine-tunes: at the sd3 model's layer.
            "layer": config["models"][appendix_model("sd3" if m in MAGNET_ROLES else m)]["analysis_layer"],
            "paper_model": PAPER_MODEL_KEYS[m],
            "paper_dataset": paper_dataset_key(d),
            "role_model": PAPER_MODELS[m],
            "role_dataset": PAPER_DATASETS[d],
        }
        for m in main_table_model_roles(name)
        for d in dataset_roles
    ]


def magnet_role_models():
    """The MAGNET variants the appendix roles name (sd3_magnet_sa1b, sd3_magnet_coco), those the config sets."""
    return [appendix_model(role) for role in MAGNET_ROLES if appendix_model(role) is not None]


def toy_world_magnet_targets():
    """The toy MAGNET table, when the run is the toy world (as toy_world_targets) and the config names variants."""
    if not toy_world_targets() or not magnet_role_models():
        return []
    return [f"{TABLES}/toy_world_magnet_t{config['attention']['timestep']}.{ext}" for ext in ("csv", "md")]
