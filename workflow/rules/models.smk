# Model folders built locally (the toy world's tiny pipelines).


rule build_tiny_model:
    output:
        # The whole folder, so that Snakemake clears it before a rebuild.
        directory("results/models/{model}"),
    params:
        seed=lambda wildcards: model_config(wildcards)["build"]["seed"],
        backbone=lambda wildcards: model_config(wildcards)["backbone"],
        variant=lambda wildcards: model_config(wildcards)["build"]["variant"],
    log:
        "logs/build_tiny_model/{model}.log",
    benchmark:
        "results/benchmarks/build_tiny_model/{model}.tsv"
    resources:
        mem_mb=2000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro build-tiny-model --backbone {params.backbone} --variant {params.variant} --out {output:q} --seed {params.seed} 2> {log:q}"
