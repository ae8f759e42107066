# MAGNET training (docs/method.md#magnet): one job per `magnet.runs` entry trains the LoRA of its base model and
# writes results/magnet/<run>/adapter, which the model variants with `lora: <run>` apply (magnet_eval.smk).
# Checkpoints stay in results/magnet/<run>/checkpoints, outside the job's output: a killed job resumes from them.


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


rule magnet_train:
    input:
        model=lambda wildcards: model_inputs(magnet_base(wildcards)),
        data=lambda wildcards: magnet_data_root(wildcards) / "manifest.json",
        validation=magnet_validation_inputs,
    output:
        directory("results/magnet/{run}/adapter"),
    params:
        settings=magnet_settings,
        run_dir=lambda wildcards: f"results/magnet/{wildcards.run}",
    message:
        "MAGNET training of {wildcards.run}: LoRA on the expert layer's I2T attention (resumes from its checkpoints); writes {output}; progress in {log}"
    log:
        "logs/magnet_train/{run}.log",
    benchmark:
        "results/benchmarks/magnet_train/{run}.tsv"
    resources:
        mem_mb=lambda wildcards: model_mem_mb(magnet_base(wildcards)),
        runtime=lambda wildcards: 30 if config["models"][magnet_run(wildcards)["model"]]["toy"] else 1440,
        gpu=lambda wildcards: model_uses_gpu(magnet_base(wildcards)),
        device=lambda wildcards: model_device(magnet_base(wildcards)),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro magnet-train --settings {params.settings:q} --run-dir {params.run_dir:q} --adapter {output:q}"
        " --device {resources.device:q} 2> {log:q}"
