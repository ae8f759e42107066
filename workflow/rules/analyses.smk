# Segmentation analyses across settings: the timestep sweep (appendix Fig. 2), score normalisation
# (appendix Table 1), both from the attention cache, and unsupervised segmentation (main Table 2) from an
# empty-prompt cache.


rule timestep_sweep:
    input:
        lambda wildcards: expand(
            "results/segmentation/{model}/{dataset}/t{k}/per_layer.csv",
            model=wildcards.model,
            dataset=wildcards.dataset,
            k=config["analyses"]["timestep_sweep"]["timesteps"],
        ),
    output:
        csv=report(
            f"{TABLES}/timestep_sweep_{{model}}_{{dataset}}.csv",
            caption="../report/timestep_sweep.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/timestep_sweep_{{model}}_{{dataset}}.md",
        png=report(
            f"{FIGURES}/timestep_sweep_{{model}}_{{dataset}}.png",
            caption="../report/timestep_sweep.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/timestep_sweep_{{model}}_{{dataset}}.pdf",
    params:
        layer=lambda wildcards: model_config(wildcards)["analysis_layer"],
        paper_model=lambda wildcards: model_config(wildcards).get("paper_name", "none"),
        paper_dataset=lambda wildcards: config["datasets"][wildcards.dataset].get("paper_name", "none"),
    log:
        "logs/timestep_sweep/{model}_{dataset}.log",
    benchmark:
        "results/benchmarks/timestep_sweep/{model}_{dataset}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro timestep-sweep --scores {input:q} --layer {params.layer}"
        " --paper-model {params.paper_model:q} --paper-dataset {params.paper_dataset:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


# Table 1's four scorings of one cache: post- or pre-softmax maps, raw or min-max normalised (both before and
# after merging a class's tokens: the config defaults of the official code, the likeliest reading of the table).
NORMALISATION_VARIANTS = {
    "post_raw": {"softmax": True, "norm_before_merge": False, "norm_after_merge": False},
    "post_minmax": {"softmax": True, "norm_before_merge": True, "norm_after_merge": True},
    "pre_raw": {"softmax": False, "norm_before_merge": False, "norm_after_merge": False},
    "pre_minmax": {"softmax": False, "norm_before_merge": True, "norm_after_merge": True},
}


rule score_normalisation_variant:
    input:
        cache=attention_cache,
        dataset=prepared_manifest,
    output:
        "results/segmentation/{model}/{dataset}/t{timestep}/normalisation_{variant}.csv",
    wildcard_constraints:
        variant="|".join(NORMALISATION_VARIANTS),
    params:
        settings=lambda wildcards: json.dumps(
            config["segmentation"] | NORMALISATION_VARIANTS[wildcards.variant], sort_keys=True
        ),
        dataset_root=prepared_root,
    message:
        "Scoring {wildcards.model} on {wildcards.dataset} at t = {wildcards.timestep}, normalisation {wildcards.variant}; writes {output}; progress in {log}"
    log:
        "logs/score_normalisation_variant/{model}_{dataset}_t{timestep}_{variant}.log",
    benchmark:
        "results/benchmarks/score_normalisation_variant/{model}_{dataset}_t{timestep}_{variant}.tsv"
    resources:
        mem_mb=4000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-layers --cache {input.cache:q} --dataset-root {params.dataset_root:q}"
        " --settings {params.settings:q} --out {output:q} 2> {log:q}"


rule normalisation_table:
    input:
        expand(
            "results/segmentation/{{model}}/{{dataset}}/t{{timestep}}/normalisation_{variant}.csv",
            variant=NORMALISATION_VARIANTS,
        ),
    output:
        csv=report(
            f"{TABLES}/normalisation_{{model}}_{{dataset}}_t{{timestep}}.csv",
            caption="../report/normalisation_table.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/normalisation_{{model}}_{{dataset}}_t{{timestep}}.md",
    params:
        layer=lambda wildcards: model_config(wildcards)["analysis_layer"],
        paper_model=lambda wildcards: model_config(wildcards).get("paper_name", "none"),
        paper_dataset=lambda wildcards: config["datasets"][wildcards.dataset].get("paper_name", "none"),
    log:
        "logs/normalisation_table/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/normalisation_table/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro normalisation-table --scores {input:q} --layer {params.layer}"
        " --paper-model {params.paper_model:q} --paper-dataset {params.paper_dataset:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"


rule extract_unsupervised_attention_shard:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        "results/attention_null/{model}/{dataset}/t{timestep}/shards/{scatteritem}.json",
    params:
        settings=unsupervised_extraction_settings,
        dataset_root=prepared_root,
        out_dir=lambda wildcards, output: Path(output[0]).parent.parent,
    message:
        "Empty-prompt forward passes of {wildcards.model} on {wildcards.dataset} (unsupervised maps), image shard {wildcards.scatteritem}; writes {output}; progress in {log}"
    log:
        "logs/extract_unsupervised_attention/{model}_{dataset}_t{timestep}_{scatteritem}.log",
    benchmark:
        "results/benchmarks/extract_unsupervised_attention/{model}_{dataset}_t{timestep}_{scatteritem}.tsv"
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


rule extract_unsupervised_attention:
    input:
        shards=gather.extraction(
            "results/attention_null/{{model}}/{{dataset}}/t{{timestep}}/shards/{scatteritem}.json"
        ),
        dataset=prepared_manifest,
    output:
        "results/attention_null/{model}/{dataset}/t{timestep}/manifest.json",
    params:
        dataset_root=prepared_root,
    log:
        "logs/extract_unsupervised_attention/{model}_{dataset}_t{timestep}.log",
    localrule: True
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro gather-attention --shards {input.shards:q} --dataset-root {params.dataset_root:q} 2> {log:q}"


rule score_unsupervised:
    input:
        cache="results/attention_null/{model}/{dataset}/t{timestep}/manifest.json",
        dataset=prepared_manifest,
    output:
        "results/unsupervised/{model}/{dataset}/t{timestep}/scores.csv",
    params:
        dataset_root=prepared_root,
        kl_threshold=config["analyses"]["unsupervised"]["kl_threshold"],
        geometry=config["analyses"]["unsupervised"]["geometry"],
        matching=config["analyses"]["unsupervised"]["matching"],
        scored_classes=lambda wildcards: config["datasets"][wildcards.dataset]["scored_classes"] or "none",
    message:
        "Unsupervised segmentation of {wildcards.dataset} with {wildcards.model}; writes {output}; progress in {log}"
    log:
        "logs/score_unsupervised/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/score_unsupervised/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=4000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-unsupervised --cache {input.cache:q} --dataset-root {params.dataset_root:q}"
        " --kl-threshold {params.kl_threshold} --geometry {params.geometry} --matching {params.matching}"
        " --scored-classes {params.scored_classes} --out {output:q} 2> {log:q}"


rule unsupervised_table:
    input:
        "results/unsupervised/{model}/{dataset}/t{timestep}/scores.csv",
    output:
        csv=report(
            f"{TABLES}/unsupervised_{{model}}_{{dataset}}_t{{timestep}}.csv",
            caption="../report/unsupervised_table.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/unsupervised_{{model}}_{{dataset}}_t{{timestep}}.md",
    params:
        layer=lambda wildcards: model_config(wildcards)["analysis_layer"],
        paper_model=lambda wildcards: model_config(wildcards).get("paper_name", "none"),
        paper_dataset=lambda wildcards: config["datasets"][wildcards.dataset].get("paper_name", "none"),
    log:
        "logs/unsupervised_table/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/unsupervised_table/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro unsupervised-table --scores {input:q} --layer {params.layer}"
        " --paper-model {params.paper_model:q} --paper-dataset {params.paper_dataset:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"
