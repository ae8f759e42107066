# Forward passes: attention maps cached on disk, once per (model, dataset, timestep).
#
# Scatter/gather: `extract_attention_shard` runs the forward passes of one shard of the dataset's images (the
# scatter named `extraction`: 1 shard by default, `--set-scatter extraction=8` spreads one dataset over 8 GPUs
# or cluster nodes); the shards write their per-image files into the same cache folder, and `extract_attention`
# checks the shards and writes the cache's manifest. A killed shard re-runs alone and keeps the images it had
# cached. Device and batch size are operational (resources, recorded in the manifests): changing them re-runs
# nothing.


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
    log:
        "logs/extract_attention/{model}_{dataset}_t{timestep}_{scatteritem}.log",
    benchmark:
        "results/benchmarks/extract_attention/{model}_{dataset}_t{timestep}_{scatteritem}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=model_uses_gpu,
        device=model_device,
        batch_size=config["attention"]["batch_size"],
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro extract-attention --settings {params.settings:q} --dataset-root {params.dataset_root:q}"
        " --out-dir {params.out_dir:q} --shard {wildcards.scatteritem} --shard-manifest {output:q}"
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
        "seg4diff-repro gather-attention --shards {input.shards:q} --dataset-root {params.dataset_root:q}"
        " --out {output:q} 2> {log:q}"
