# Model folders built locally (the toy world's tiny pipelines), and Hugging Face models fetched into the local hub
# cache as jobs of their own (local rules: on a cluster they run on the login node, which has internet).


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


rule download_model:
    output:
        "results/model_downloads/{model}.json",
    params:
        source=lambda wildcards: model_config(wildcards)["source"],
        backbone=lambda wildcards: model_config(wildcards)["backbone"],
        revision=lambda wildcards: (
            f"--revision {model_config(wildcards)['revision']}" if model_config(wildcards)["revision"] else ""
        ),
    message:
        "Downloading {params.source} from the Hugging Face hub into its cache (tens of GB for the real models; an interrupted download resumes); writes {output}; progress in {log}"
    log:
        "logs/download_model/{model}.log",
    localrule: True
    resources:
        mem_mb=2000,
        downloads=1,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro download-model --backbone {params.backbone} --source {params.source:q} {params.revision}"
        " --out {output:q} 2> {log:q}"
