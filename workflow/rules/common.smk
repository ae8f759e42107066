# Config checks and the small helpers the rules share.

import json
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

# Jobs run this checkout's package, whichever environment runs them (the active one, or with `--sdm conda`
# one built from envs/*.yaml, which hold third-party packages only: Snakemake builds a conda env from a copy of
# its file under .snakemake/conda/, where no relative path reaches the checkout). workflow/bin/seg4diff-repro
# runs `python -m seg4diff_repro.cli` with the job's Python; PYTHONPATH puts the checkout's src/ first.
# The workflow process itself imports the same code, for the config checks and the code fingerprints.
PACKAGE_SRC = Path(workflow.basedir) / "src"
if (PACKAGE_SRC / "seg4diff_repro").is_dir():
    sys.path.insert(0, str(PACKAGE_SRC))
    _job_pythonpath = f"export PYTHONPATH={shlex.quote(str(PACKAGE_SRC))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
else:  # a copy of the workflow without the package (tests): the installed package
    _job_pythonpath = ""


def job_environment() -> dict:
    """The environment variables a job's shell gives its `seg4diff-repro` command (the shell prefix below)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(workflow.basedir) / 'workflow/bin'}:{env.get('PATH', '')}"
    if _job_pythonpath:
        env["PYTHONPATH"] = str(PACKAGE_SRC) + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    return env


# Snakemake's default prefix is `set -euo pipefail; `; a custom prefix replaces it, so it is repeated here.
shell.prefix(
    f"set -euo pipefail; export PATH={shlex.quote(str(Path(workflow.basedir) / 'workflow/bin'))}:$PATH; "
    + _job_pythonpath
)

from seg4diff_repro.attention.cache import CACHE_FORMAT
from seg4diff_repro.config import apply_defaults, check_config, load_schema, looks_like_local_path, lora_base
from seg4diff_repro.fork_server import SERVER_ENV, start_server, stop_server
from seg4diff_repro.provenance import command_fingerprint

FORK_SERVER = {}  # the socket of the jobs' fork server while one runs (Snakefile: onstart)

SCHEMA = Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"

# Tool caches go to the project's .cache/ (gitignored), not the home folder: jobs inherit these variables. A value
# the user set is kept (e.g. HF_HOME pointing at a cache that already holds the hub models); a `hf auth login` token
# in the default place is still read.
PROJECT_CACHE = Path(workflow.basedir) / ".cache"
os.environ.setdefault(
    "HF_TOKEN_PATH",
    str(Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface",
             "token").expanduser()),
)
for _variable, _folder in {"MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "", "HF_HOME": "huggingface",
                           "TORCH_HOME": "torch"}.items():
    os.environ.setdefault(_variable, str(PROJECT_CACHE / _folder))

# Friendly errors first (they name the key and the allowed values), then Snakemake's own validation.
check_config(config, SCHEMA)
validate(config, "../schemas/config.schema.yaml")
apply_defaults(config, load_schema(SCHEMA))

DATA_ROOT = Path(config["data"]["root"])
# Each config writes its figures and tables under its own folder (outputs.namespace): the toy world, a
# rehearsal and the paper run never write the same file, so none of them can pass for another's.
FIGURES = f"figures/{config['outputs']['namespace']}"
TABLES = f"paper_tables/{config['outputs']['namespace']}"
REPORT_PAGES = f"results/report/{config['outputs']['namespace']}"


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


# ---- MAGNET variants (issue 15): a model with `lora: <run>` loads its run's base model, then the run's adapter.
def magnet_adapter_folder(run):
    """The adapter folder that the MAGNET training of `run` (rule magnet_train) writes, and its evaluations read."""
    return f"results/magnet/{run}/adapter"


def model_lora_folder(name):
    """The adapter folder that jobs loading configured model `name` apply, or None for a model without `lora`."""
    run = config["models"][name]["lora"]
    return None if run is None else magnet_adapter_folder(run)
# ---- end of MAGNET variants


def model_inputs(wildcards):
    """The built model folder, the trained toy model's index file, the record of a Hugging Face model's
    download (rule download_model), so that GPU jobs never download, or every file of a local model folder;
    for a MAGNET variant (`lora`), those of its base model and the adapter folder."""
    lora = model_lora_folder(wildcards.model)
    if lora is not None:
        return model_inputs(SimpleNamespace(model=lora_base(config, wildcards.model))) + [lora]
    model = model_config(wildcards)
    if "build" in model:
        return [model["source"]]
    if model["source"] == config["toy_model"]["source"]:
        return [f"{model['source']}/model_index.json"]  # so that retraining it re-runs its analyses
    if not looks_like_local_path(model["source"]):
        return [f"results/model_downloads/{wildcards.model}.json"]
    return local_model_files(model["source"])


def local_model_files(source):
    """Every file of a model folder the workflow does not build itself, one written by save_pretrained. New weights
    or configs at the same path are then newer inputs, so `snakemake -n` plans what read them. Hidden folders (a
    download tool's metadata) are left out."""
    root = Path(source).expanduser()
    return sorted(str(path) for path in root.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts))


def prepared_root(wildcards):
    return DATA_ROOT / "prepared" / config["datasets"][wildcards.dataset]["prepared"]


def prepared_manifest(wildcards):
    return prepared_root(wildcards) / "manifest.json"


def forward_batch_size(command):
    """`attention.batch_size` for a command; `auto` (largest that fits) is extraction's, score-heads takes 4."""
    size = config["attention"]["batch_size"]
    return 4 if size == "auto" and command == "score-heads" else size


def extraction_settings(wildcards):
    """JSON of everything that determines the cached maps; a change re-runs extraction."""
    return _extraction_settings(wildcards, {})


def unsupervised_extraction_settings(wildcards):
    """The empty prompt at the model's analysis layer only (docs/method.md#unsupervised-protocol), padded as the geometry asks."""
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
            "revision": model["revision"],
            "lora": model_lora_folder(wildcards.model),
            "model_options": model["options"],
            "dtype": model["dtype"],
            "timestep": int(wildcards.get("timestep", config["attention"]["timestep"])),
            "num_steps": model["num_inference_steps"],
            "layers": attention["layers"],
            "seed": attention["seed"],
            "short_side": dataset["short_side"],
            "resize": attention["resize"],
            "prompt": attention["prompt"],
            "background_name": attention["background_name"],
            "prompt_classes_from": attention["prompt_classes_from"],
            "split": dataset["split"],
            "background": dataset["background"],
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
    return [f"{TABLES}/{stem}.{ext}" for stem in stems for ext in ("csv", "md")] + [
        f"{FIGURES}/{stem}.{ext}" for stem in stems for ext in ("png", "pdf")
    ]


def toy_world_targets():
    """The toy world's summary and generations, when the run has both toy models on the VOC20 stand-in view
    (appendix.datasets.voc20: toy_objects in config.yaml)."""
    run = config["run"]
    if {"toy_sd3", "toy_sd3_random"} <= set(run["models"]) and appendix_dataset("voc20") in run["datasets"]:
        timestep = config["attention"]["timestep"]
        return [
            f"{TABLES}/toy_world_grounding_t{timestep}.md",
            f"{FIGURES}/toy_world_per_layer_t{timestep}.png",
            f"{FIGURES}/toy_generations.png",
        ]
    return []


def sweep_pairs():
    """(model, dataset) pairs swept over timesteps: Fig. 2's (the sd3 role on the voc20 and coco_object roles),
    and with `analyses.timestep_sweep.scope: all` every run model x dataset too. Fig. 2's pairs are one sweep job
    each in both scopes (one model load and one encoding per image for all timesteps), not a job per timestep."""
    sweep = config["analyses"]["timestep_sweep"]
    if not sweep["timesteps"]:
        return []
    pairs = [(appendix_model("sd3"), appendix_dataset(role)) for role in ("voc20", "coco_object")]
    if sweep["scope"] == "all":
        pairs = [(model, dataset) for model in config["run"]["models"] for dataset in config["run"]["datasets"]] + pairs
    return list(dict.fromkeys(pairs))


def sweep_timesteps():
    """The timesteps of a sweep job: the sweep's and the analysis timestep, whose all-layer cache it also writes."""
    return sorted({*config["analyses"]["timestep_sweep"]["timesteps"], config["attention"]["timestep"]})


def attention_manifest(model, dataset, timestep):
    """The cache of (model, dataset, k): inside its pair's sweep job when swept, else its own job's."""
    if (model, dataset) in sweep_pairs() and int(timestep) in sweep_timesteps():
        return f"results/attention/{model}/{dataset}/sweep/t{timestep}/manifest.json"
    return f"results/attention/{model}/{dataset}/t{timestep}/manifest.json"


def attention_cache(wildcards):
    return attention_manifest(wildcards.model, wildcards.dataset, wildcards.timestep)


def sweep_settings(wildcards):
    """The sweep job's shared settings (those of its analysis-timestep cache)."""
    return _extraction_settings(wildcards, {"timestep": config["attention"]["timestep"]})


def sweep_caches(wildcards):
    """JSON of the sweep job's caches: every layer at the analysis timestep, the sweep's layers elsewhere."""
    sweep, analysis_k = config["analyses"]["timestep_sweep"], config["attention"]["timestep"]
    layers = config["attention"]["layers"]
    sweep_layers = [model_config(wildcards)["analysis_layer"]] if sweep["record"] == "analysis_layer" else layers
    return json.dumps([
        {
            "timestep": k,
            "layers": layers if k == analysis_k else sweep_layers,
            "out_dir": f"results/attention/{wildcards.model}/{wildcards.dataset}/sweep/t{k}",
        }
        for k in sweep_timesteps()
    ])


def timestep_sweep_targets(run_only: bool = False):
    """The sweep tables of every sweep pair, or with ``run_only`` of those whose model and dataset are both in `run`
    (Fig. 2's pairs are the appendix roles' models and datasets, which `all_run` leaves out)."""
    run = config["run"]
    return [
        f"{TABLES}/timestep_sweep_{model}_{dataset}.{ext}"
        for model, dataset in sweep_pairs()
        if not run_only or (model in run["models"] and dataset in run["datasets"])
        for ext in ("csv", "md")
    ]


def normalisation_targets():
    timestep = config["attention"]["timestep"]
    return [
        f"{TABLES}/normalisation_{model}_{dataset}_t{timestep}.md"
        for model in config["run"]["models"]
        for dataset in config["run"]["datasets"]
    ]


def unsupervised_targets():
    timestep = config["attention"]["timestep"]
    models = config["analyses"]["unsupervised"]["models"] or config["run"]["models"]
    return [
        f"{TABLES}/unsupervised_{model}_{dataset}_t{timestep}.md"
        for model in models
        for dataset in config["analyses"]["unsupervised"]["datasets"]
    ]


def run_targets():
    """The analyses of every model x dataset in `run`: per-layer, timestep sweep, normalisation, unsupervised."""
    return per_layer_targets() + timestep_sweep_targets(run_only=True) + normalisation_targets() + unsupervised_targets()


def appendix_model(role):
    """The configured model standing in for the paper's `role` (sd3, sd35, flux) in the appendix targets."""
    return config["appendix"]["models"][role]


def appendix_dataset(role):
    """The configured dataset standing in for the paper's `role` (voc20, voc21, coco_object, ...)."""
    return config["appendix"]["datasets"][role]


def add_code_fingerprints(rules):
    """A `code` parameter, its stage's fingerprint, for each of the rules that call `seg4diff-repro <command>`."""
    for each in rules:
        match = re.search(r"seg4diff-repro ([a-z-]+)", each.shellcmd or "")
        fingerprint = command_fingerprint(match.group(1)) if match else None
        if fingerprint is not None:
            each.set_params(code=fingerprint)

