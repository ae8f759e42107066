# Helpers of the generation rules (workflow/rules/generation.smk, which includes this file): run settings,
# the layers each appendix role sweeps, and the targets of `rule all_generation`.

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
    """A user prompts file (so that editing it re-runs the fidelity runs); the packaged lists are code."""
    if wildcards.prompt_set == "fidelity" and GENERATION["prompts_file"]:
        return [GENERATION["prompts_file"]]
    return []


def generation_run_settings(wildcards):
    """JSON of everything that determines a run's images; a change re-runs it. Device and batch size are
    operational: the rule passes them as resources (recorded in the run's manifest, re-running nothing)."""
    model = model_config(wildcards)
    fidelity = wildcards.prompt_set == "fidelity"
    settings = {
        "model": wildcards.model,
        "backbone": model["backbone"],
        "source": model["source"],
        "revision": model["revision"],
        "dtype": model["dtype"],
        "run": wildcards.run,
        "figure": None if fidelity else wildcards.prompt_set,
        "prompts_file": GENERATION["prompts_file"] if fidelity else None,
        "n_prompts": GENERATION["n_prompts"] if fidelity else None,
        "seeds": GENERATION["seeds"] if fidelity else [GENERATION["grid_seed"]],
        "steps": model["num_inference_steps"],
        "cfg": GENERATION["cfg"],
        "guidance_scale": GENERATION["guidance_scale"],
        "blur_sigma": GENERATION["blur_sigma"],
        "blur_kernel": GENERATION["blur_kernel"],
        "max_sequence_length": GENERATION["max_sequence_length"],
    }
    if "guidance_scale" in model["options"]:
        settings["distilled_guidance"] = model["options"]["guidance_scale"]
    return json.dumps(settings, sort_keys=True)


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
    """Every generation-side appendix figure and table (Figs. 1, 5, 7, 10, 18, 19)."""
    tables = [*FIDELITY_FIGURES, "fig01_drawbench_prompts"]
    return (
        [f"{TABLES}/{name}.{ext}" for name in tables for ext in ("csv", "md")]
        + [f"{FIGURES}/{name}.{ext}" for name in [*tables, *GRID_FIGURES] for ext in ("png", "pdf")]
    )
