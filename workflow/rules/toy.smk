# The toy-shapes dataset, generated procedurally in the common prepared layout.


rule prepare_toy_shapes:
    output:
        DATA_ROOT / "prepared/toy_shapes/manifest.json",
    params:
        root=lambda wildcards, output: Path(output[0]).parent,
        n_train=config["toy_shapes"]["n_train"],
        n_val=config["toy_shapes"]["n_val"],
        image_size=config["toy_shapes"]["image_size"],
        seed=config["toy_shapes"]["seed"],
    log:
        "logs/prepare_toy_shapes.log",
    benchmark:
        "results/benchmarks/prepare_toy_shapes.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro make-toy-shapes --root {params.root:q} --n-train {params.n_train} --n-val {params.n_val}"
        " --image-size {params.image_size} --seed {params.seed} 2> {log:q}"
