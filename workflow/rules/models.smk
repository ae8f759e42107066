# Model folders built locally (the toy world's tiny pipelines).


rule build_tiny_model:
    output:
        "results/models/{model}/model_index.json",
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
        seed=lambda wildcards: model_config(wildcards)["build"]["seed"],
    log:
        "logs/build_tiny_model/{model}.log",
    benchmark:
        "results/benchmarks/build_tiny_model/{model}.tsv"
    resources:
        mem_mb=2000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro build-tiny-model --out {params.out:q} --seed {params.seed} 2> {log:q}"
