# Helpers of the generation rules (workflow/rules/generation.smk, which includes this file): run settings,
# the layers each appendix role sweeps, the MAGNET comparisons (Fig. 20, Table 3), and the targets of
# `rule all_generation`.

from seg4diff_repro.config import generation_layers
from seg4diff_repro.generation.runs import RUN_PATTERN

GENERATION = config["analyses"]["generation"]
# Output names (the paper's figure numbers) -> appendix role.
FIDELITY_FIGURES = {"fig05_fidelity_sd3": "sd3", "fig07_fidelity_sd35": "sd35", "fig10_fidelity_flux": "flux"}
# Output names -> (prompt set = the caption's prompts, run mode).
GRID_FIGURES = {"fig18_perturbation_grid": ("fig18", "perturb"), "fig19_guidance_grid": ("fig19", "guidance")}


def fidelity_layers(role):
    name = appendix_model(role)
    key = f"analyses.generation.fidelity_layers.{role}"
    return generation_layers(GENERATION["fidelity_layers"][role], name, config["models"][name], key)


def grid_layers():
    name = appendix_model("sd3")
    return generation_layers(GENERATION["grid_layers"], name, config["models"][name], "analyses.generation.grid_layers")


def generation_prompt_inputs(wildcards):
    """A user prompts file (so that editing it re-runs the fidelity runs); the packaged lists are code. A Table 3
    prompts file is an input once it exists: until then the DAG builds, and its job stops naming the file."""
    if wildcards.prompt_set == "fidelity" and GENERATION["prompts_file"]:
        return [GENERATION["prompts_file"]]
    if wildcards.prompt_set.startswith("clipscore_"):
        prompts_file = clipscore_prompt_set(wildcards.prompt_set)["prompts_file"]
        return [prompts_file] if prompts_file and Path(prompts_file).is_file() else []
    return []


def generation_adapter_inputs(wildcards):
    """A MAGNET variant's adapter folder (rule magnet_train), applied after loading; nothing for other models."""
    lora = model_config(wildcards).get("lora")
    return [magnet_adapter_folder(lora)] if lora else []


def generation_run_settings(wildcards):
    """JSON of everything that determines a run's images; a change re-runs it. Device and batch size are
    operational: the rule passes them as resources (recorded in the run's manifest, re-running nothing)."""
    model = model_config(wildcards)
    fidelity = wildcards.prompt_set == "fidelity"
    if wildcards.prompt_set.startswith("clipscore_"):
        return clipscore_run_settings(wildcards, model)
    settings = {
        "model": wildcards.model,
        "backbone": model["backbone"],
        "source": model["source"],
        "revision": model["revision"],
        "dtype": model["dtype"],
        "run": wildcards.run,
        "figure": None if fidelity else wildcards.prompt_set,
        "prompts_file": GENERATION["prompts_file"] if fidelity else None,
        "n_prompts": GENERATION["n_prompts"] if fidelity else fig20_n_prompts(wildcards.prompt_set),
        "seeds": GENERATION["seeds"] if fidelity else [grid_seed(wildcards.prompt_set)],
        "steps": generation_steps(model),
        "cfg": GENERATION["cfg"],
        "guidance_scale": GENERATION["guidance_scale"],
        "blur_sigma": GENERATION["blur_sigma"],
        "blur_kernel": GENERATION["blur_kernel"],
        "max_sequence_length": GENERATION["max_sequence_length"],
    }
    if "guidance_scale" in model["options"]:
        settings["distilled_guidance"] = model["options"]["guidance_scale"]
    if model.get("lora"):
        settings["lora"] = magnet_adapter_folder(model["lora"])
    return json.dumps(settings, sort_keys=True)


def generation_steps(model):
    """Sampling steps of a generation run: `analyses.generation.steps`, else the model's own."""
    return GENERATION["steps"] or model["num_inference_steps"]


def fig20_n_prompts(prompt_set):
    """How many of a caption-prompt figure's prompts its runs draw: Fig. 20's configured number, else all (null)."""
    return GENERATION["fig20_n_prompts"] if prompt_set == "fig20" else None


def grid_seed(prompt_set):
    """The one seed of a caption-prompt figure: Fig. 20's (every column, every model) or the grids' (Figs. 18, 19)."""
    return GENERATION["fig20_seed"] if prompt_set == "fig20" else GENERATION["grid_seed"]


# --- MAGNET: appendix Fig. 20 and main Table 3 (issue 15) ------------------------------------------------
CLIPSCORE = GENERATION["clipscore"]
# Rows of both, in the paper's Fig. 20 order (baseline, COCO, SA-1B), with their labels.
MAGNET_ROWS = {"sd3": "Baseline", "sd3_magnet_coco": "MAGNET (COCO)", "sd3_magnet_sa1b": "MAGNET (SA-1B)"}


def magnet_comparison_ready():
    """Fig. 20 and Table 3 join `all` when both MAGNET roles are set and each one's adapter can be had: its run is
    configured for training (`magnet.runs`) or its folder is already there."""
    roles = config["appendix"]["models"]
    if not all(roles.get(role) is not None for role in MAGNET_ROWS):
        return False
    runs = (config.get("magnet") or {}).get("runs") or {}
    loras = [config["models"][roles[role]].get("lora") for role in MAGNET_ROWS]
    return all(lora is None or lora in runs or Path(magnet_adapter_folder(lora)).is_dir() for lora in loras)


def magnet_stand_in():
    """'toy_sd3 for SD3-medium, toy_sd3_magnet_coco for SD3-medium + MAGNET (COCO), ...'."""
    return ", ".join(
        f"{appendix_model(role)} for SD3-medium" + ("" if role == "sd3" else f" + {label}")
        for role, label in MAGNET_ROWS.items()
    )


def clipscore_prompt_set(prompt_set):
    return CLIPSCORE["prompt_sets"][prompt_set.removeprefix("clipscore_")]


def clipscore_run_settings(wildcards, model):
    """GenerationRun JSON of a Table 3 run: the set's prompts and seeds, unperturbed, CFG `cfg`, the generation steps."""
    prompt_set = clipscore_prompt_set(wildcards.prompt_set)
    settings = {
        "model": wildcards.model,
        "backbone": model["backbone"],
        "source": model["source"],
        "revision": model["revision"],
        "dtype": model["dtype"],
        "run": wildcards.run,
        "prompts_file": prompt_set["prompts_file"],
        "prompts_list": prompt_set["prompts"],
        "n_prompts": prompt_set["n_prompts"],
        "seeds": prompt_set["seeds"],
        "steps": generation_steps(model),
        "cfg": GENERATION["cfg"],
        "max_sequence_length": GENERATION["max_sequence_length"],
    }
    if model.get("lora"):
        settings["lora"] = magnet_adapter_folder(model["lora"])
    return json.dumps(settings, sort_keys=True)


def fig20_runs(wildcards):
    return [f"results/generation/{appendix_model(role)}/fig20/none" for role in MAGNET_ROWS]


def clipscore_runs():
    """(prompt set, run folder) of every model x prompt set of Table 3."""
    return [
        (name, f"results/generation/{appendix_model(role)}/clipscore_{name}/none")
        for role in MAGNET_ROWS
        for name in CLIPSCORE["prompt_sets"]
    ]


def clipscore_settings():
    """JSON of the scorer's ClipScoreSettings (the device is operational: a resource of the rule)."""
    return json.dumps({k: v for k, v in CLIPSCORE.items() if k not in ("device", "prompt_sets")}, sort_keys=True)


def clipscore_models_are_toy():
    models = [config["models"][appendix_model(role)] for role in MAGNET_ROWS]
    return all(model["toy"] or model["random_weights"] for model in models)


def magnet_generation_targets():
    """Appendix Fig. 20 and main Table 3 (without prompt sets: no table)."""
    figures = [f"{FIGURES}/fig20_magnet_generations.{ext}" for ext in ("png", "pdf")]
    tables = [f"{TABLES}/main_table3_clipscore.{ext}" for ext in ("csv", "md")] if CLIPSCORE["prompt_sets"] else []
    return figures + tables


def fidelity_settings():
    """JSON of the scorers' FidelitySettings (the device is operational: a resource of the rule)."""
    return json.dumps({k: v for k, v in GENERATION["fidelity"].items() if k != "device"}, sort_keys=True)


def fidelity_runs(wildcards):
    """The run folders of a fidelity figure's model: unperturbed, then one per perturbed layer."""
    role = FIDELITY_FIGURES[wildcards.name]
    runs = ["none", *(f"perturb_l{layer}" for layer in fidelity_layers(role))]
    return [f"results/generation/{appendix_model(role)}/fidelity/{run}" for run in runs]


def fidelity_reference(wildcards):
    return f"results/generation/{appendix_model(FIDELITY_FIGURES[wildcards.name])}/fidelity/none"


def fidelity_model_is_toy(wildcards):
    """Toy models and random-weight stand-ins may be scored by random-weight backbones (offline)."""
    model = config["models"][appendix_model(FIDELITY_FIGURES[wildcards.name])]
    return model["toy"] or model["random_weights"]


def grid_runs(wildcards):
    prompt_set, mode = GRID_FIGURES[wildcards.name]
    model = appendix_model("sd3")
    return [f"results/generation/{model}/{prompt_set}/{mode}_l{layer}" for layer in grid_layers()]


def drawbench_usage():
    """JSON for Fig. 1: which analyses use how many of the first DrawBench prompts (null: all; a file: its own)."""
    fidelity = GENERATION["prompts_file"] or GENERATION["n_prompts"]
    return json.dumps({
        "fidelity (Figs. 5, 7, 10)": fidelity,
        "value norms (Figs. 6, 9, 15)": config["analyses"]["attention_figures"]["n_prompts"],
    })


def generation_targets():
    """Every generation-side appendix figure and table (Figs. 1, 5, 7, 10, 18, 19; Fig. 20 and main Table 3 once
    the MAGNET models can be had)."""
    tables = [*FIDELITY_FIGURES, "fig01_drawbench_prompts"]
    return (
        [f"{TABLES}/{name}.{ext}" for name in tables for ext in ("csv", "md")]
        + [f"{FIGURES}/{name}.{ext}" for name in [*tables, *GRID_FIGURES] for ext in ("png", "pdf")]
        + (magnet_generation_targets() if magnet_comparison_ready() else [])
    )
