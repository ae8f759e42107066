# Helpers of the MAGNET rules (magnet.smk: training; magnet_eval.smk: the toy table).


wildcard_constraints:
    run="|".join(sorted(config["magnet"]["runs"], key=len, reverse=True)) or "(?!)",


def magnet_run(wildcards):
    return config["magnet"]["runs"][wildcards.run]


def magnet_base(wildcards):
    """The run's base model, as the wildcards of the model rules."""
    return SimpleNamespace(model=magnet_run(wildcards)["model"])


def magnet_data_root(wildcards):
    return DATA_ROOT / "prepared" / magnet_run(wildcards)["data"]["prepared"]


def magnet_validation_inputs(wildcards):
    """The validation set's manifest, for checkpoint_policy best."""
    dataset = magnet_run(wildcards)["validation"]["dataset"]
    return [prepared_manifest(SimpleNamespace(dataset=dataset))] if dataset else []


def magnet_settings(wildcards):
    """JSON of everything that decides the adapter (the base model, data, recipe and validation)."""
    run = magnet_run(wildcards)
    model = config["models"][run["model"]]
    data = run["data"]
    validation = None
    if run["validation"]["dataset"]:
        dataset = SimpleNamespace(model=run["model"], dataset=run["validation"]["dataset"])
        settings = json.loads(_extraction_settings(dataset, {"limit": run["validation"]["limit"]}))
        validation = {"root": str(prepared_root(dataset)), "settings": settings}
    return json.dumps(
        {
            "run": wildcards.run,
            "model": {"name": run["model"], **{key: model[key] for key in ("backbone", "source", "revision", "dtype")}},
            "data": {"root": str(magnet_data_root(wildcards)), **{k: v for k, v in data.items() if k != "prepared"}},
            "recipe": {"protocol": run["protocol"], **run["recipe"]},
            "validation": validation,
        },
        sort_keys=True,
    )


def magnet_supervised_layer():
    """The layer the variants' runs supervised (magnet.runs.<run>.recipe.layer; MAGNET's default: 9)."""
    layers = {config["magnet"]["runs"][config["models"][model]["lora"]]["recipe"].get("layer", 9)
              for model in magnet_role_models()}
    if len(layers) != 1:
        raise ValueError(f"the MAGNET variants {magnet_role_models()} were trained on different layers {sorted(layers)}: "
                            "the toy MAGNET table compares one supervised layer; give their runs the same recipe.layer")
    return layers.pop()
