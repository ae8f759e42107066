# Forward passes: attention maps cached on disk, once per (model, dataset, timestep). A swept (model, dataset)
# pair (`analyses.timestep_sweep`) is one job over all its timesteps, so that its VAE and text encoders run once
# per image; its caches are results/attention/{model}/{dataset}/sweep/t{k}/ (see attention_manifest).
#
# Scatter/gather: each extraction runs as shards of the dataset's images (the scatter named `extraction`: 1 shard
# by default, `--set-scatter extraction=8` spreads one dataset over 8 GPUs or cluster nodes). The shards write
# their per-image files into the same cache folders; the gather rule checks them and writes each cache's manifest.
# A killed shard re-runs alone and keeps the images it had cached. Device and batch size are operational
# (resources, recorded in the manifests): changing them re-runs nothing.


scattergather:
    extraction=1,


rule extract_attention_shard:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        "results/attention/{model}/{dataset}/t{timestep}/shards/{scatteritem}.json",
    params:
        settings=extraction_settings,
        dataset_root=prepared_root,
        out_dir=lambda wildcards, output: Path(output[0]).parent.parent,
    message:
        "Forward passes of {wildcards.model} on {wildcards.dataset} at t = {wildcards.timestep}, image shard {wildcards.scatteritem}: attention maps; writes {output}; progress in {log}"
    log:
        "logs/extract_attention/{model}_{dataset}_t{timestep}_{scatteritem}.log",
    benchmark:
        "results/benchmarks/extract_attention/{model}_{dataset}_t{timestep}_{scatteritem}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=model_uses_gpu,
        device=model_device,
        batch_size=forward_batch_size("extract-attention"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro extract-attention --settings {params.settings:q} --dataset-root {params.dataset_root:q}"
        " --out-dir {params.out_dir:q} --shard {wildcards.scatteritem} --shard-record {output:q}"
        " --device {resources.device:q} --batch-size {resources.batch_size} 2> {log:q}"


rule extract_attention:
    input:
        shards=gather.extraction("results/attention/{{model}}/{{dataset}}/t{{timestep}}/shards/{scatteritem}.json"),
        dataset=prepared_manifest,
    output:
        "results/attention/{model}/{dataset}/t{timestep}/manifest.json",
    params:
        dataset_root=prepared_root,
    log:
        "logs/extract_attention/{model}_{dataset}_t{timestep}.log",
    localrule: True
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro gather-attention --shards {input.shards:q} --dataset-root {params.dataset_root:q} 2> {log:q}"


rule extract_attention_sweep_shard:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        "results/attention/{model}/{dataset}/sweep/shards/{scatteritem}.json",
    params:
        settings=sweep_settings,
        caches=sweep_caches,
        dataset_root=prepared_root,
    message:
        "Forward passes of {wildcards.model} on {wildcards.dataset} at every timestep of the sweep (Fig. 2), image shard {wildcards.scatteritem}: attention maps; writes {output}; progress in {log}"
    log:
        "logs/extract_attention_sweep/{model}_{dataset}_{scatteritem}.log",
    benchmark:
        "results/benchmarks/extract_attention_sweep/{model}_{dataset}_{scatteritem}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=model_uses_gpu,
        device=model_device,
        batch_size=forward_batch_size("extract-attention"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro extract-attention --settings {params.settings:q} --caches {params.caches:q}"
        " --dataset-root {params.dataset_root:q} --shard {wildcards.scatteritem} --shard-record {output:q}"
        " --device {resources.device:q} --batch-size {resources.batch_size} 2> {log:q}"


rule extract_attention_sweep:
    input:
        shards=gather.extraction("results/attention/{{model}}/{{dataset}}/sweep/shards/{scatteritem}.json"),
        dataset=prepared_manifest,
    output:
        [f"results/attention/{{model}}/{{dataset}}/sweep/t{k}/manifest.json" for k in sweep_timesteps()],
    params:
        dataset_root=prepared_root,
    log:
        "logs/extract_attention_sweep/{model}_{dataset}.log",
    localrule: True
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro gather-attention --shards {input.shards:q} --dataset-root {params.dataset_root:q} 2> {log:q}"
