# Scoring the cached maps, then the per-layer table and figure.


rule score_layers:
    input:
        cache=attention_cache,
        dataset=prepared_manifest,
    output:
        "results/segmentation/{model}/{dataset}/t{timestep}/per_layer.csv",
    params:
        settings=json.dumps(config["segmentation"], sort_keys=True),
        dataset_root=prepared_root,
    message:
        "Scoring every layer of {wildcards.model} on {wildcards.dataset} at t = {wildcards.timestep}; progress in {log}"
    log:
        "logs/score_layers/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/score_layers/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=4000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-layers --cache {input.cache:q} --dataset-root {params.dataset_root:q}"
        " --settings {params.settings:q} --out {output:q} 2> {log:q}"


rule per_layer_table:
    input:
        "results/segmentation/{model}/{dataset}/t{timestep}/per_layer.csv",
    output:
        csv=report(
            f"{TABLES}/per_layer_{{model}}_{{dataset}}_t{{timestep}}.csv",
            caption="../report/per_layer_table.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/per_layer_{{model}}_{{dataset}}_t{{timestep}}.md",
    params:
        paper_model=lambda wildcards: model_config(wildcards).get("paper_name", "none"),
        paper_dataset=lambda wildcards: config["datasets"][wildcards.dataset].get("paper_name", "none"),
    log:
        "logs/per_layer_table/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/per_layer_table/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro per-layer-table --scores {input:q} --paper-model {params.paper_model:q}"
        " --paper-dataset {params.paper_dataset:q} --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"


rule per_layer_figure:
    input:
        f"{TABLES}/per_layer_{{model}}_{{dataset}}_t{{timestep}}.csv",
    output:
        png=report(
            f"{FIGURES}/per_layer_{{model}}_{{dataset}}_t{{timestep}}.png",
            caption="../report/per_layer_figure.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/per_layer_{{model}}_{{dataset}}_t{{timestep}}.pdf",
    log:
        "logs/per_layer_figure/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/per_layer_figure/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro per-layer-figure --table {input:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"
