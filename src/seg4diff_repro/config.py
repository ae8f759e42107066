"""Checks of the pipeline config that name the offending key and the allowed values.

The Snakefile calls `check_config` before Snakemake's own `validate`, so that a bad config fails
when the DAG is built with a message a user can act on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import yaml

from seg4diff_repro.models.tiny_sizes import TINY_SD35_CONFIG, TOY_WORLD_SD3_CONFIG, TinyFluxConfig, TinySD3Config
from seg4diff_repro.steps import PAPER_STEPS

# Joint (MM-DiT) layer counts of the hub models, so that the DAG can be checked without downloading.
KNOWN_LAYER_COUNTS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": 24,
    "stabilityai/stable-diffusion-3.5-medium": 24,
    "black-forest-labs/FLUX.1-dev": 57,  # 19 double-stream + 38 single-stream blocks
}


class ConfigError(ValueError):
    """The config is invalid; the message names the key and what is allowed."""


def _key_path(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}" if parts else str(part))
    return "".join(parts) or "<top level>"


def _subschema_at(schema: dict, path) -> dict:
    node = schema
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part) or node.get("additionalProperties") or {}
    return node


def _explain(error: jsonschema.ValidationError, schema: dict) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_subschema_at(schema, error.absolute_path).get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return f"unknown key(s) {unknown} in {where}; allowed keys: {allowed}"
    if error.validator == "enum":
        return f"{where} = {error.instance!r} is not allowed; allowed values: {error.validator_value}"
    if error.validator in ("minimum", "maximum"):
        node = error.schema
        return (f"{where} = {error.instance!r} is out of range; allowed: "
                f"{node.get('minimum', '-inf')}..{node.get('maximum', 'inf')}")
    if error.validator == "pattern":
        return (f"{where} = {error.instance!r} is not allowed; expected "
                f"{error.schema.get('description', 'a match of ' + error.validator_value)}")
    if error.validator == "oneOf":
        return f"{where} = {error.instance!r} is invalid; expected: {error.schema.get('description', error.message)}"
    return f"{where}: {error.message}"


def load_schema(schema_path: str | Path) -> dict:
    return yaml.safe_load(Path(schema_path).read_text())


def tiny_sd3_config(build: dict) -> TinySD3Config:
    """The sizes that the rule build_tiny_model gives an sd3-backbone model with this `build` entry."""
    return {"sd35": TINY_SD35_CONFIG, "toy_world": TOY_WORLD_SD3_CONFIG}.get(build.get("variant"), TinySD3Config())


def model_num_layers(model: dict) -> int | None:
    """Number of joint layers of a configured model, or None if it cannot be known before loading it."""
    source = str(model["source"])
    transformer_config = Path(source) / "transformer" / "config.json"
    if transformer_config.is_file():
        sizes = json.loads(transformer_config.read_text())
        # diffusers' Flux config counts the double-stream blocks in num_layers; the single-stream ones follow them.
        return sizes["num_layers"] + (sizes["num_single_layers"] if model["backbone"] == "flux" else 0)
    if "build" in model and model["backbone"] == "flux":
        config = TinyFluxConfig()
        return config.num_layers + config.num_single_layers
    if "build" in model:
        return tiny_sd3_config(model["build"]).num_layers
    return KNOWN_LAYER_COUNTS.get(source)


# Double-stream (MM-DiT) blocks of the Flux hub models: the layers whose I2T attention Fig. 10 perturbs.
KNOWN_DOUBLE_STREAM_COUNTS = {"black-forest-labs/FLUX.1-dev": 19}


def perturbable_layer_count(model: dict) -> int | None:
    """Joint layers the generation analyses perturb: every SD3/SD3.5 layer, Flux's double-stream ones (Fig. 10)."""
    if model["backbone"] != "flux":
        return model_num_layers(model)
    transformer_config = Path(str(model["source"])) / "transformer" / "config.json"
    if transformer_config.is_file():
        return json.loads(transformer_config.read_text())["num_layers"]  # diffusers' Flux count of double blocks
    if "build" in model:
        return TinyFluxConfig().num_layers
    return KNOWN_DOUBLE_STREAM_COUNTS.get(str(model["source"]))


def generation_layers(spec: str | list[int], name: str, model: dict, key: str) -> list[int]:
    """The layers that a generation setting (``all`` or a list) means for model ``name``; ConfigError naming ``key``."""
    count = perturbable_layer_count(model)
    kind = "double-stream layers" if model["backbone"] == "flux" else "joint layers"
    if spec == "all":
        if count is None:
            raise ConfigError(f"{key} = all, but the {kind} of model {name!r} ({model['source']}) cannot be "
                              "counted before loading it: list them")
        return list(range(count))
    bad = [layer for layer in spec if count is not None and not 0 <= layer < count]
    if bad:
        raise ConfigError(f"{key} contains {bad}, out of range for model {name!r}: allowed 0..{count - 1} "
                          f"(0-based {kind}) or \"all\"")
    return sorted(spec)


def _check_generation(config: dict) -> None:
    generation = config["analyses"]["generation"]
    roles = appendix_roles(config)
    for role, spec in generation["fidelity_layers"].items():
        key = f"analyses.generation.fidelity_layers.{role}"
        generation_layers(spec, roles[role], config["models"][roles[role]], key)
    generation_layers(generation["grid_layers"], roles["sd3"], config["models"][roles["sd3"]],
                      "analyses.generation.grid_layers")
    if generation["blur_kernel"] % 2 == 0:
        raise ConfigError(
            f"analyses.generation.blur_kernel = {generation['blur_kernel']} must be odd (a centred kernel)"
        )
    fidelity = generation["fidelity"]
    if fidelity["dino_revision"] is not None and looks_like_local_path(fidelity["dino_source"]):
        raise ConfigError(
            f"analyses.generation.fidelity.dino_revision is set, but dino_source = {fidelity['dino_source']!r} "
            "is a local folder, which has no hub revision: remove dino_revision"
        )
    if fidelity["clip_revision"] is not None and Path(fidelity["clip_pretrained"]).is_file():
        raise ConfigError(
            f"analyses.generation.fidelity.clip_revision is set, but clip_pretrained = "
            f"{fidelity['clip_pretrained']!r} is a local file, which has no hub revision: remove clip_revision"
        )
    if generation["fidelity"]["weights"] == "random":
        for role in generation["fidelity_layers"]:  # the fidelity figures' roles (the MAGNET roles have no scores)
            name = roles[role]
            if not (config["models"][name].get("toy", False) or config["models"][name].get("random_weights", False)):
                raise ConfigError(
                    f"analyses.generation.fidelity.weights = 'random' is allowed for toy models and random-weight stand-ins only, but "
                    f"appendix.models.{role} = {name!r} is neither (models.{name}.toy and .random_weights are not true): random CLIP/DINO "
                    "scores say nothing about a real model. Set analyses.generation.fidelity.weights: pretrained "
                    "(hub weights, or local copies via fidelity.clip_pretrained and fidelity.dino_source)."
                )


def appendix_roles(config: dict) -> dict[str, str]:
    """``appendix.models`` without the optional roles left null (MAGNET's): role → configured model."""
    return {role: name for role, name in config["appendix"]["models"].items() if name is not None}


# What a MAGNET variant shares with its run's base model: the weights the LoRA was trained on, the forward pass
# (switches, schedule) and the layer it supervises, so that a variant is scored exactly as its base (its
# empty-prompt cache holds that layer).
LORA_BASE_KEYS = ("backbone", "source", "revision", "dtype", "options", "num_inference_steps", "analysis_layer")


def _check_magnet(config: dict) -> None:
    """Every `lora` names a run; every run names a base model that is no variant itself; a variant keeps its
    base model's weights and layer (LORA_BASE_KEYS)."""
    runs, models = config["magnet"]["runs"], config["models"]
    for run_name, run in runs.items():
        base = models.get(run["model"])
        if base is None:
            raise ConfigError(f"magnet.runs.{run_name}.model = {run['model']!r} is not defined; defined models: "
                              f"{sorted(models)}")
        if base["lora"] is not None:
            raise ConfigError(
                f"magnet.runs.{run_name}.model = {run['model']!r} is itself a MAGNET variant (models.{run['model']}"
                f".lora = {base['lora']!r}): name a model without `lora`, such as the one the variant was made from"
            )
        validation = run["validation"]["dataset"]
        if validation is not None and validation not in config["datasets"]:
            raise ConfigError(f"magnet.runs.{run_name}.validation.dataset = {validation!r} is not defined; defined "
                              f"datasets: {sorted(config['datasets'])}")
        if run["recipe"].get("checkpoint_policy") == "best" and validation is None:
            raise ConfigError(f"magnet.runs.{run_name}.recipe.checkpoint_policy is best, which needs a validation set: "
                              f"set magnet.runs.{run_name}.validation.dataset (the official: voc20), or use last")
        if run["data"]["format"] == "sa1b" and run["protocol"] != "sa1b":
            raise ConfigError(f"magnet.runs.{run_name}.data.format is sa1b, whose masks have no classes for the "
                              f"{run['protocol']} protocol's identity matching: use protocol sa1b")
    for name, model in models.items():
        run_name = model["lora"]
        if run_name is None:
            continue
        if run_name not in runs:
            raise ConfigError(
                f"models.{name}.lora = {run_name!r} names no MAGNET run; defined runs (magnet.runs): "
                f"{sorted(runs)}. Define the run under magnet.runs (model, protocol), or remove the key"
            )
        base_name = runs[run_name]["model"]
        base = models[base_name]
        for key in LORA_BASE_KEYS:
            if model[key] != base[key]:
                raise ConfigError(
                    f"models.{name}.{key} = {model[key]!r}, but its adapter (lora: {run_name}) is trained on "
                    f"models.{base_name} (magnet.runs.{run_name}.model), whose {key} is {base[key]!r}: a variant "
                    f"keeps its base model's {', '.join(LORA_BASE_KEYS)}; set models.{name}.{key} to {base[key]!r}"
                )
        if "build" in model:
            raise ConfigError(f"models.{name} has both `lora` and `build`: a variant loads its base model's "
                              f"weights (models.{base_name}.source); remove `build`")
    roles = config["appendix"]["models"]
    for role in ("sd3", "sd35", "flux"):  # their generation analyses load models without adapters
        if models[roles[role]]["lora"] is not None:
            raise ConfigError(
                f"appendix.models.{role} = {roles[role]!r} is a MAGNET variant (lora: {models[roles[role]]['lora']}), "
                "but the generation analyses of this role do not apply adapters: name its base model "
                f"({runs[models[roles[role]]['lora']]['model']!r}); the \"+ MAGNET\" rows come from "
                "appendix.models.sd3_magnet_sa1b and sd3_magnet_coco"
            )
    # The "+ MAGNET" rows of the main tables sit under the SD3 row: the same base model, the role's protocol.
    for protocol in ("sa1b", "coco"):
        role, name = f"sd3_magnet_{protocol}", roles.get(f"sd3_magnet_{protocol}")
        if name is None:
            continue
        run_name = models[name]["lora"]
        if run_name is None:
            raise ConfigError(f"appendix.models.{role} = {name!r} has no `lora`: name a MAGNET variant (a model "
                              f"with `lora: <run>`), or null for no \"+ MAGNET\" rows")
        run = runs[run_name]
        if run["protocol"] != protocol or run["model"] != roles["sd3"]:
            raise ConfigError(
                f"appendix.models.{role} = {name!r} applies run {run_name!r} (protocol {run['protocol']}, base model "
                f"{run['model']!r}), but the role needs protocol {protocol} on the sd3 role's model "
                f"{roles['sd3']!r} (appendix.models.sd3): name a variant of such a run"
            )


def lora_base(config: dict, name: str) -> str:
    """The model whose weights model ``name`` loads: its MAGNET run's base model for a `lora` variant, else itself."""
    run = config["models"][name].get("lora")
    return name if run is None else config["magnet"]["runs"][run]["model"]


# MAGNET (issue 15): appendix Fig. 20 and main Table 3 compare the sd3 role with the two MAGNET roles.
MAGNET_ROLES = ("sd3_magnet_coco", "sd3_magnet_sa1b")


def _check_magnet_generation(config: dict) -> None:
    roles = config["appendix"]["models"]
    given = [role for role in MAGNET_ROLES if roles.get(role) is not None]
    if given and len(given) < len(MAGNET_ROLES):
        missing = next(role for role in MAGNET_ROLES if roles.get(role) is None)
        raise ConfigError(f"appendix.models.{given[0]} is set but appendix.models.{missing} is not: Fig. 20 and "
                          "Table 3 compare the baseline with both MAGNET models; set both, or neither")
    clipscore = config["analyses"]["generation"]["clipscore"]
    check_device(clipscore["device"], "analyses.generation.clipscore.device")
    for name, prompt_set in clipscore["prompt_sets"].items():
        if (prompt_set["prompts"] is None) == (prompt_set["prompts_file"] is None):
            raise ConfigError(f"analyses.generation.clipscore.prompt_sets.{name}: give exactly one of `prompts` "
                              "(a list) and `prompts_file` (a text file, one prompt per line); set the other to null")
    if not given or clipscore["weights"] != "random":
        return
    for role in ("sd3", *MAGNET_ROLES):
        name = roles[role]
        if not (config["models"][name].get("toy", False) or config["models"][name].get("random_weights", False)):
            raise ConfigError(
                f"analyses.generation.clipscore.weights = 'random' is allowed for toy models and random-weight "
                f"stand-ins only, but appendix.models.{role} = {name!r} is neither: a random CLIP says nothing about "
                "a real model. Set analyses.generation.clipscore.weights: pretrained."
            )


def check_config(config: dict, schema_path: str | Path) -> None:
    """Raise ConfigError for the first schema violation, or bad value the schema cannot see: an out-of-range layer
    or timestep, an undefined name, a device torch would reject, a local path that does not exist.

    The schema's defaults are filled (into a copy) before the checks, so that a key left out is checked at its default.
    """
    schema = load_schema(schema_path)
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config: " + "; ".join(_explain(e, schema) for e in errors[:5]))
    config = apply_defaults(copy.deepcopy(config), schema)

    for kind in ("models", "datasets"):
        for name in config["run"][kind]:
            if name not in config[kind]:
                raise ConfigError(f"run.{kind} names {name!r}, which is not defined; defined {kind}: {sorted(config[kind])}")
        for role, name in config["appendix"][kind].items():
            if name is not None and name not in config[kind]:  # null: an optional role left out (MAGNET's)
                raise ConfigError(
                    f"appendix.{kind}.{role} names {name!r}, which is not defined; "
                    f"defined {kind}: {sorted(config[kind])}"
                )

    for name in (config.get("analyses", {}).get("unsupervised", {}).get("models") or []):
        if name not in config["models"]:
            raise ConfigError(
                f"analyses.unsupervised.models names {name!r}, which is not defined; defined models: {sorted(config['models'])}"
            )

    for name, model in config["models"].items():
        if model.get("revision") is not None and looks_like_local_path(model["source"]):
            raise ConfigError(
                f"models.{name}.revision = {model['revision']!r} is set, but models.{name}.source = "
                f"{model['source']!r} is a local folder, which has no hub revision: remove the revision "
                "(a local folder is identified by its contents)"
            )

    _check_magnet(config)  # after each model's own checks: a variant repeats its base model's keys
    for name, model in config["models"].items():
        expected = f"results/models/{name}"
        if "build" in model and str(model["source"]).rstrip("/") != expected:
            raise ConfigError(
                f"models.{name}.source = {model['source']!r}: a model with `build` is written by the rule "
                f"build_tiny_model to {expected!r}; set source to that path or remove `build`"
            )
        check_device(model["device"], f"models.{name}.device")

    used_models = list(dict.fromkeys([*config["run"]["models"], *appendix_roles(config).values()]))
    for name in used_models:  # a variant loads its base model's folder, which a rule may build
        _check_model_source(name, config["models"][lora_base(config, name)], config["toy_model"]["source"])
    _check_timesteps(config, used_models)

    attention = config["attention"]
    for name in used_models:
        model = config["models"][name]
        layers = attention["layers"]
        count = model_num_layers(model)
        analysis_layer = model["analysis_layer"]
        if count is not None and not 0 <= analysis_layer < count:
            raise ConfigError(
                f"models.{name}.analysis_layer = {analysis_layer} is out of range: allowed 0..{count - 1}"
            )
        if layers != "all" and count is not None:
            bad = [layer for layer in layers if not 0 <= layer < count]
            if bad:
                raise ConfigError(
                    f"attention.layers contains {bad}, out of range for model {name!r}: "
                    f"allowed 0..{count - 1} (0-based joint layers) or \"all\""
                )

    head_map_layers = config["analyses"]["attention_figures"]["head_map_layers"]
    sd3_role = config["appendix"]["models"]["sd3"]
    count = model_num_layers(config["models"][sd3_role])
    bad = [layer for layer in head_map_layers or [] if count is not None and layer >= count]
    if bad:
        raise ConfigError(
            f"analyses.attention_figures.head_map_layers contains {bad}, out of range for model {sd3_role!r} "
            f"(appendix.models.sd3): allowed 0..{count - 1}, or null for every layer"
        )

    check_device(config["toy_model"]["device"], "toy_model.device", allow_auto=True)
    check_device(config["toy_generations"]["device"], "toy_generations.device")
    check_device(config["analyses"]["generation"]["fidelity"]["device"], "analyses.generation.fidelity.device")
    check_device(config["verification"]["device"], "verification.device", allow_auto=True)  # the spot check's
    _check_local_paths(config)
    _check_generation(config)
    _check_magnet_generation(config)


def _check_timesteps(config: dict, used_models: list[str]) -> None:
    """Every k of 't = k' must lie on the schedule of each model it is used with (1..num_inference_steps)."""
    appendix = config["appendix"]["models"]
    figures = config["analyses"]["attention_figures"]
    for name in used_models:
        steps = config["models"][name]["num_inference_steps"]
        uses: list[tuple[str, int | list[int]]] = [("attention.timestep", config["attention"]["timestep"])]
        if name in config["run"]["models"] or name == appendix["sd3"]:  # fig02 sweeps the sd3 role
            uses.append(("analyses.timestep_sweep.timesteps", config["analyses"]["timestep_sweep"]["timesteps"]))
        if name in appendix.values():
            uses.append(("analyses.attention_figures.timesteps", figures["timesteps"]))
        if name == appendix["sd3"]:
            uses.append(("analyses.attention_figures.map_timestep", figures["map_timestep"]))
        for key, value in uses:
            # Under the paper's step convention the attention figures count t = k on SD3's 28 steps.
            paper_steps = key.startswith("analyses.attention_figures") and figures["step_convention"] == "paper"
            limit = PAPER_STEPS if paper_steps else steps
            bad = [k for k in (value if isinstance(value, list) else [value]) if not 1 <= k <= limit]
            if bad:
                what = f"contains {bad}, which are" if isinstance(value, list) else f"= {value} is"
                schedule = (f"the paper's t = k of {PAPER_STEPS} (analyses.attention_figures.step_convention: paper)"
                            if paper_steps else f"k steps before the end of its {steps}-step schedule, "
                            f"models.{name}.num_inference_steps")
                raise ConfigError(f"{key} {what} out of range for model {name!r}: allowed 1..{limit} ({schedule})")


# The devices the jobs can run on, in torch's grammar: a type, optionally `:index` (digits, no leading zero).
# Other types torch knows (xpu, hip, meta, ...) are refused: nothing here places work on them.
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:(0|[1-9][0-9]*))?")


def check_device(value: str, key: str, *, allow_auto: bool = False) -> None:
    """ConfigError naming ``key`` unless ``value`` is a device string torch accepts and the jobs can use (``auto``
    where allowed). Checked without importing torch, so that parsing the Snakefile stays light."""
    if allow_auto and value == "auto":
        return
    if not DEVICE_PATTERN.fullmatch(value):
        allowed = "cpu, cuda, cuda:N, mps" + (" or auto" if allow_auto else "")
        raise ConfigError(f"{key} = {value!r} is not a torch device the jobs run on; use {allowed}")


# First path parts that are this project's own folders: `models/...` is a path here, never a hub owner.
PROJECT_FOLDERS = ("models", "results", "data", ".cache")


def looks_like_local_path(source: str | Path) -> bool:
    """Whether a model ``source`` names a local folder rather than a Hugging Face id (``owner/name``).

    Local: it starts with ``/``, ``./``, ``../`` or ``~``, does not have exactly one ``/``, or its first part is
    one of the project's folders or an existing folder (``models/toy_sd3``, ``results/models/...``).
    """
    source = str(source)
    if source.startswith(("/", "./", "../", "~")) or source in (".", "..") or source.count("/") != 1:
        return True
    owner = source.split("/")[0]
    return owner in PROJECT_FOLDERS or Path(owner).is_dir()


def _check_model_source(name: str, model: dict, trainable_source: str) -> None:
    """A local `source` must be a model folder, unless a rule writes it (`build`, the trained toy model)."""
    source = str(model["source"])
    if "build" in model or source.rstrip("/") == str(trainable_source).rstrip("/") or not looks_like_local_path(source):
        return
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"models.{name}.source = {source!r} is a local path (not a Hugging Face id, owner/name) and does not "
            "exist: point it at a folder written by `pipeline.save_pretrained`, or at the hub id"
        )
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"models.{name}.source = {source!r} has no model_index.json: point it at a folder written by "
            "`pipeline.save_pretrained`, or at the hub id"
        )


def _check_local_paths(config: dict) -> None:
    """Files and folders the config names must exist (checked here, not hours later in a job)."""
    for name, path in config["data"]["paths"].items():
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"data.paths.{name} = {path!r} is not a folder: point it at the raw copy of the "
                              "dataset, or remove the entry to download it")
    generation = config["analyses"]["generation"]
    prompts_file = generation["prompts_file"]
    if prompts_file is not None and not Path(prompts_file).expanduser().is_file():
        raise ConfigError(f"analyses.generation.prompts_file = {prompts_file!r} is not a file: give a text file "
                          "with one prompt per line, or null for the packaged DrawBench prompts")
    fidelity = generation["fidelity"]
    if fidelity["weights"] != "pretrained":
        return
    clip = str(fidelity["clip_pretrained"])
    # An open_clip tag is a plain name (openai, laion2b_s34b_b79k); anything path-like must be a checkpoint file.
    if ("/" in clip or clip.startswith(("~", ".")) or Path(clip).suffix in (".pt", ".pth", ".bin", ".safetensors")) \
            and not Path(clip).expanduser().is_file():
        raise ConfigError(f"analyses.generation.fidelity.clip_pretrained = {clip!r} is a path but not a file: give "
                          "the checkpoint file, or an open_clip tag such as openai")
    dino = str(fidelity["dino_source"])
    if looks_like_local_path(dino) and not Path(dino).expanduser().is_dir():
        raise ConfigError(f"analyses.generation.fidelity.dino_source = {dino!r} is a local path and not a folder: "
                          "give a folder written by save_pretrained, or a Hugging Face id")


def apply_defaults(config: dict, schema: dict) -> dict:
    """Fill the schema's defaults in place, also inside maps such as `models.<name>` (which `validate` skips)."""
    properties = schema.get("properties", {})
    for key, subschema in properties.items():
        if key not in config and "default" in subschema:
            config[key] = json.loads(json.dumps(subschema["default"]))
    for key, value in config.items():
        subschema = properties.get(key) or schema.get("additionalProperties")
        if isinstance(value, dict) and isinstance(subschema, dict):
            apply_defaults(value, subschema)
    return config
