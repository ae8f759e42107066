# Segmentation analyses across settings: the timestep sweep (appendix Fig. 2).


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
            "paper_tables/timestep_sweep_{model}_{dataset}.csv",
            caption="../report/timestep_sweep.rst",
            category="Segmentation",
            subcategory="Timestep sweep",
        ),
        markdown="paper_tables/timestep_sweep_{model}_{dataset}.md",
        png=report(
            "figures/timestep_sweep_{model}_{dataset}.png",
            caption="../report/timestep_sweep.rst",
            category="Segmentation",
            subcategory="Timestep sweep",
        ),
        pdf="figures/timestep_sweep_{model}_{dataset}.pdf",
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
