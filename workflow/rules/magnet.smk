# MAGNET training (docs/method.md#magnet): one job per `magnet.runs` entry trains the LoRA of its base model and
# writes results/magnet/<run>/adapter, which the model variants with `lora: <run>` apply (magnet_eval.smk).
# Checkpoints stay in results/magnet/<run>/checkpoints, outside the job's output: a killed job resumes from them.


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
