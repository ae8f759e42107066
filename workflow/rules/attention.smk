# Forward passes: attention maps cached on disk, once per (model, dataset, timestep). A swept (model, dataset)
# pair (`analyses.timestep_sweep`) is one job over all its timesteps, so that its VAE and text encoders run once
# per image; its caches are results/attention/{model}/{dataset}/sweep/t{k}/ (see attention_manifest).


rule extract_attention:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        "results/attention/{model}/{dataset}/t{timestep}/manifest.json",
    params:
        settings=extraction_settings,
        dataset_root=prepared_root,
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        device=lambda wildcards: model_config(wildcards)["device"],
        batch_size=forward_batch_size("extract-attention"),
    message:
        "Forward passes of {wildcards.model} on {wildcards.dataset} at t = {wildcards.timestep}: attention maps; writes {output}; progress in {log}"
    log:
        "logs/extract_attention/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/extract_attention/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=8000,
        gpu=lambda wildcards: int(model_config(wildcards)["device"].startswith("cuda")),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro extract-attention --settings {params.settings:q} --dataset-root {params.dataset_root:q}"
        " --out-dir {params.out_dir:q} --device {params.device:q} --batch-size {params.batch_size} 2> {log:q}"


rule extract_attention_sweep:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        [f"results/attention/{{model}}/{{dataset}}/sweep/t{k}/manifest.json" for k in sweep_timesteps()],
    params:
        settings=sweep_settings,
        caches=sweep_caches,
        dataset_root=prepared_root,
        device=lambda wildcards: model_config(wildcards)["device"],
        batch_size=forward_batch_size("extract-attention"),
    log:
        "logs/extract_attention_sweep/{model}_{dataset}.log",
    benchmark:
        "results/benchmarks/extract_attention_sweep/{model}_{dataset}.tsv"
    resources:
        mem_mb=8000,
        gpu=lambda wildcards: int(model_config(wildcards)["device"].startswith("cuda")),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro extract-attention --settings {params.settings:q} --caches {params.caches:q}"
        " --dataset-root {params.dataset_root:q} --device {params.device:q} --batch-size {params.batch_size} 2> {log:q}"
