# Config checks and the small helpers the rules share.

import json
import re
from pathlib import Path

from seg4diff_repro.attention.cache import CACHE_FORMAT
from seg4diff_repro.config import apply_defaults, check_config, load_schema
from seg4diff_repro.provenance import command_fingerprint

SCHEMA = Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"

# Friendly errors first (they name the key and the allowed values), then Snakemake's own validation.
check_config(config, SCHEMA)
validate(config, "../schemas/config.schema.yaml")
apply_defaults(config, load_schema(SCHEMA))

DATA_ROOT = Path(config["data"]["root"])


# Only configured names match, so that file names joined with "_" parse unambiguously.
wildcard_constraints:
    model="|".join(sorted(config["models"], key=len, reverse=True)),
    dataset="|".join(sorted(config["datasets"], key=len, reverse=True)),
    timestep="[0-9]+",


def model_config(wildcards):
    return config["models"][wildcards.model]


def model_device(wildcards):
    """The model's torch device. A resource, not a parameter: moving a run to another device (or batch size)
    re-runs nothing, and the manifests record what was used. On a host with several GPUs, each job asking
    for `cuda` gets a free GPU of its own (seg4diff_repro/gpu_slots.py)."""
    return model_config(wildcards)["device"]


def model_uses_gpu(wildcards):
    """1 for a job on a GPU: `--resources gpu=N` runs N of them at once, the SLURM executor asks for one."""
    return int(model_device(wildcards).startswith("cuda"))


def gpu_job_scale(name):
    """Runtime (minutes) and host memory (MB) of a GPU job on configured model `name`, for cluster executors:
    a toy model takes a minute and little memory; a real one is sized for COCO-Object's 5000 images and Flux's
    12B weights, which pass through host memory when loading. The SLURM profile can override both per rule."""
    toy = config["models"][name]["toy"]
    return {"runtime": 15 if toy else 240, "mem_mb": 4000 if toy else 48000}


def model_runtime(wildcards):
    return gpu_job_scale(wildcards.model)["runtime"]


def model_mem_mb(wildcards):
    return gpu_job_scale(wildcards.model)["mem_mb"]


def is_hub_id(source):
    """A Hugging Face id (owner/name) rather than a local folder."""
    path = Path(source)
    return not path.exists() and not path.is_absolute() and len(path.parts) == 2 and not source.startswith((".", "~"))


def model_inputs(wildcards):
    """The built model folder, the trained toy model's index file, or the record of a Hugging Face model's
    download (rule download_model), so that GPU jobs never download."""
    model = model_config(wildcards)
    if "build" in model:
        return [model["source"]]
    if model["source"] == config["toy_model"]["source"]:
        return [f"{model['source']}/model_index.json"]  # so that retraining it re-runs its analyses
    if is_hub_id(model["source"]):
        return [f"results/model_downloads/{wildcards.model}.json"]
    return []


def prepared_root(wildcards):
    return DATA_ROOT / "prepared" / config["datasets"][wildcards.dataset]["prepared"]


def prepared_manifest(wildcards):
    return prepared_root(wildcards) / "manifest.json"


def extraction_settings(wildcards):
    """JSON of everything that determines the cached maps; a change re-runs extraction."""
    return _extraction_settings(wildcards, {})


def unsupervised_extraction_settings(wildcards):
    """The empty prompt at the model's analysis layer only (method_spec D.1), padded as the geometry asks."""
    pad_multiple = 32 if config["analyses"]["unsupervised"]["geometry"] == "official" else None
    return _extraction_settings(
        wildcards,
        {"prompt": "null", "layers": [model_config(wildcards)["analysis_layer"]], "pad_multiple": pad_multiple},
    )


# Not a params function itself: Snakemake would pass input, output, ... into a **kwargs signature.
def _extraction_settings(wildcards, overrides):
    model, dataset, attention = model_config(wildcards), config["datasets"][wildcards.dataset], config["attention"]
    return json.dumps(
        {
            "model": wildcards.model,
            "dataset": wildcards.dataset,
            "backbone": model["backbone"],
            "source": model["source"],
            "model_options": model["options"],
            "dtype": model["dtype"],
            "timestep": int(wildcards.timestep),
            "num_steps": model["num_inference_steps"],
            "layers": attention["layers"],
            "seed": attention["seed"],
            "short_side": dataset["short_side"],
            "resize": attention["resize"],
            "prompt": attention["prompt"],
            "background_name": attention["background_name"],
            "split": dataset["split"],
            "drop_background": dataset["drop_background"],
            "limit": dataset["limit"],
            "cache_format": CACHE_FORMAT,
        }
        | overrides,
        sort_keys=True,
    )



def per_layer_targets():
    stems = [
        f"per_layer_{model}_{dataset}_t{config['attention']['timestep']}"
        for model in config["run"]["models"]
        for dataset in config["run"]["datasets"]
    ]
    return [f"paper_tables/{stem}.{ext}" for stem in stems for ext in ("csv", "md")] + [
        f"figures/{stem}.{ext}" for stem in stems for ext in ("png", "pdf")
    ]


def toy_world_targets():
    """The toy world's summary and generations, when the run has both toy models on toy-shapes."""
    run = config["run"]
    if {"toy_sd3", "toy_sd3_random"} <= set(run["models"]) and "toy_shapes" in run["datasets"]:
        timestep = config["attention"]["timestep"]
        return [
            f"paper_tables/toy_world_grounding_t{timestep}.md",
            f"figures/toy_world_per_layer_t{timestep}.png",
            "figures/toy_generations.png",
        ]
    return []


def timestep_sweep_targets():
    if not config["analyses"]["timestep_sweep"]["timesteps"]:
        return []
    return [
        f"paper_tables/timestep_sweep_{model}_{dataset}.{ext}"
        for model in config["run"]["models"]
        for dataset in config["run"]["datasets"]
        for ext in ("csv", "md")
    ]


def normalisation_targets():
    timestep = config["attention"]["timestep"]
    return [
        f"paper_tables/normalisation_{model}_{dataset}_t{timestep}.md"
        for model in config["run"]["models"]
        for dataset in config["run"]["datasets"]
    ]


def unsupervised_targets():
    timestep = config["attention"]["timestep"]
    return [
        f"paper_tables/unsupervised_{model}_{dataset}_t{timestep}.md"
        for model in config["run"]["models"]
        for dataset in config["analyses"]["unsupervised"]["datasets"]
    ]


def appendix_model(role):
    """The configured model standing in for the paper's `role` (sd3, sd35, flux) in the appendix targets."""
    return config["appendix"]["models"][role]


def appendix_dataset(role):
    """The configured dataset standing in for the paper's `role` (voc20, voc21, coco_object, ...)."""
    return config["appendix"]["datasets"][role]


def add_code_fingerprints(rules):
    """Give each rule that calls `seg4diff-repro <command>` a `code` parameter: its stage's fingerprint."""
    for each in rules:
        match = re.search(r"seg4diff-repro ([a-z-]+)", each.shellcmd or "")
        fingerprint = command_fingerprint(match.group(1)) if match else None
        if fingerprint is not None:
            each.set_params(code=fingerprint)
