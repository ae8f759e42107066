# The toy world's datasets (issue 16): presets of the harder toy world (datasets/toy_world.py), generated
# procedurally in the common prepared layout, one folder per preset: <data.root>/prepared/toy_world_<preset>.
# The views of `datasets:` in config.yaml read them with the background rules of the real sets they stand in for.
#
# Config keys read:
#   toy_world: {n_train, n_val, image_size, seed}

TOY_WORLD = config["toy_world"]
# datasets.toy_world.PRESET_NAMES (tests check they agree); mixed is the toy model's training set, prepared by
# toy_model.smk's prepare_toy_world_train, but a view may read a toy_world_mixed folder too.
TOY_WORLD_PRESETS = ("objects", "crowd", "scenes", "stuff", "mixed")


rule prepare_toy_world:
    output:
        DATA_ROOT / "prepared/toy_world_{preset}/manifest.json",
    wildcard_constraints:
        preset="|".join(TOY_WORLD_PRESETS),
    params:
        root=lambda wildcards, output: Path(output[0]).parent,
        n_train=TOY_WORLD["n_train"],
        n_val=TOY_WORLD["n_val"],
        image_size=TOY_WORLD["image_size"],
        seed=TOY_WORLD["seed"],
    log:
        "logs/prepare_toy_world_{preset}.log",
    benchmark:
        "results/benchmarks/prepare_toy_world_{preset}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro make-toy-world --root {params.root:q} --preset {wildcards.preset} --n-train {params.n_train}"
        " --n-val {params.n_val} --image-size {params.image_size} --seed {params.seed} --workers {threads} 2> {log:q}"
