# The toy world's trained model: a tiny SD3-architecture pipeline (12 blocks, 32 x 32 token maps) trained on the
# harder toy world's mixed preset (committed in models/toy_sd3, so the default run needs no training), and the
# figure of its generations.
#
# Config keys read:
#   toy_model: {source, train_dataset, train_images, vae_steps, vae_batch_size, transformer_steps, batch_size,
#               lr, seed, device, sizes, attention_heads, names_prob, align_layer, align_weight, compile}
#   toy_generations: {n, seed, steps, guidance_scale, device}
#   toy_world: {image_size, seed} (the training set is drawn like the default sets, preset mixed, train split only)
#
# Retrain with `snakemake toy_model --forcerun toy_model --cores 2`: about 5 min of training on one H100
# (scripts/gpu/train_toy_model.sh is the command that made the committed model), about a day on a 2-core CPU.

import os
import shlex

TOY_MODEL = config["toy_model"]
# The toy-world summary's unsupervised check reads the first unsupervised view (the COCO-Stuff stand-in), if any.
UNSUPERVISED_TOY_VIEWS = config["analyses"]["unsupervised"]["datasets"][:1]
TOY_TRAIN_ROOT = DATA_ROOT / "prepared" / TOY_MODEL["train_dataset"]


# The training set: every preset of the toy world in one vocabulary (preset mixed), as prepare_toy_world draws them.
rule prepare_toy_world_train:
    output:
        TOY_TRAIN_ROOT / "manifest.json",
    params:
        root=lambda wildcards, output: Path(output[0]).parent,
        n_train=TOY_MODEL["train_images"],
        image_size=config["toy_world"]["image_size"],
        seed=config["toy_world"]["seed"],
    log:
        "logs/prepare_toy_world_train.log",
    benchmark:
        "results/benchmarks/prepare_toy_world_train.tsv"
    # the set does not depend on the number of processes drawing it
    threads: os.cpu_count() or 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro make-toy-world --root {params.root:q} --preset mixed --n-train {params.n_train} --n-val 0"
        " --image-size {params.image_size} --seed {params.seed} --workers {threads} 2> {log:q}"


rule toy_model:
    input:
        # ancient(): a regenerated (newer) training set does not make the committed model out of date.
        train=ancient(TOY_TRAIN_ROOT / "manifest.json"),
    output:
        f"{TOY_MODEL['source']}/model_index.json",
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
        dataset_root=TOY_TRAIN_ROOT,
        vae_steps=TOY_MODEL["vae_steps"],
        vae_batch_size=TOY_MODEL["vae_batch_size"],
        transformer_steps=TOY_MODEL["transformer_steps"],
        batch_size=TOY_MODEL["batch_size"],
        lr=TOY_MODEL["lr"],
        seed=TOY_MODEL["seed"],
        device=TOY_MODEL["device"],
        sizes=TOY_MODEL["sizes"],
        attention_heads=TOY_MODEL["attention_heads"],
        names_prob=TOY_MODEL["names_prob"],
        # the alignment loss on one joint layer's image->text scores (align_layer null: none)
        align=(
            f"--align-layer {TOY_MODEL['align_layer']} --align-weight {TOY_MODEL['align_weight']}"
            if TOY_MODEL["align_layer"] is not None else ""
        ),
        compile="--compile" if TOY_MODEL["compile"] else "",  # torch.compile: the flag, or nothing (eager)
    log:
        "logs/toy_model.log",
    benchmark:
        "results/benchmarks/toy_model.tsv"
    message:
        "Training the toy model into {params.out} on {params.device}: {params.vae_steps} VAE steps at batch "
        "{params.vae_batch_size}, then {params.transformer_steps} transformer steps at batch {params.batch_size}. "
        "This takes about 5 min on one H100 GPU, but about a day on a 2-core CPU (measured there: 12 s per "
        "batch-128 VAE step, 5-7 s per batch-128 transformer step, so ~7 h + ~18 h at the defaults; 2-3x "
        "longer on a loaded machine). Progress: {log}"
    # torch on a CPU uses every core (Snakemake would otherwise pin it to 1 thread); Snakemake scales this down to
    # --cores. Not workflow.cores: that is undefined for --unlock, --summary, --report, ..., which then refuse to run.
    threads: os.cpu_count() or 1
    resources:
        mem_mb=8000,
        gpu=1 if str(TOY_MODEL["device"]) != "cpu" else 0,
    conda:
        "../../envs/torch.yaml"
    shell:
        "SECONDS=0; seg4diff-repro train-toy-model --dataset-root {params.dataset_root:q} --out {params.out:q}"
        " --vae-steps {params.vae_steps} --vae-batch-size {params.vae_batch_size}"
        " --transformer-steps {params.transformer_steps}"
        " --batch-size {params.batch_size} --lr {params.lr} --seed {params.seed} --device {params.device:q}"
        " --sizes {params.sizes} --attention-heads {params.attention_heads} --names-prob {params.names_prob}"
        " {params.align} {params.compile}"
        " 2> {log:q}; echo \"toy_model: trained in $((SECONDS / 60)) min $((SECONDS % 60)) s"
        " (device {params.device}); see {log}\" | tee -a {log:q}"


rule toy_generations:
    input:
        model=f"{TOY_MODEL['source']}/model_index.json",
        # the VOC-like objects preset: its captions name each object's colour (the figure's colour check)
        dataset=DATA_ROOT / "prepared" / "toy_world_objects" / "manifest.json",
    output:
        png=report(
            f"{FIGURES}/toy_generations.png",
            caption="../report/toy_generations.rst",
            category=report_category, subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/toy_generations.pdf",
        csv="results/toy_generations/toy_generations.csv",
    params:
        model=lambda wildcards, input: Path(input.model).parent,
        dataset_root=lambda wildcards, input: Path(input.dataset).parent,
        n=config["toy_generations"]["n"],
        seed=config["toy_generations"]["seed"],
        steps=config["toy_generations"]["steps"],
        guidance_scale=config["toy_generations"]["guidance_scale"],
    message:
        "Generating images with the toy model; writes {output}; progress in {log}"
    log:
        "logs/toy_generations.log",
    benchmark:
        "results/benchmarks/toy_generations.tsv"
    resources:
        mem_mb=2000,
        gpu=int(config["toy_generations"]["device"].startswith("cuda")),
        device=config["toy_generations"]["device"],
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro toy-generations --model {params.model:q} --dataset-root {params.dataset_root:q}"
        " --split val --n {params.n} --seed {params.seed} --steps {params.steps}"
        " --guidance-scale {params.guidance_scale} --device {resources.device:q}"
        " --png {output.png:q} --pdf {output.pdf:q} --csv {output.csv:q} 2> {log:q}"


rule toy_world_summary:
    input:
        # on the VOC20 stand-in view (appendix.datasets.voc20: toy_world_targets() asks for it only when run has it)
        trained=f"{TABLES}/per_layer_toy_sd3_{appendix_dataset('voc20')}_t{{timestep}}.csv",
        control=f"{TABLES}/per_layer_toy_sd3_random_{appendix_dataset('voc20')}_t{{timestep}}.csv",
        # proposals per image of unsupervised merging, on the first unsupervised view (the COCO-Stuff stand-in)
        unsupervised=expand(
            "results/unsupervised/toy_sd3/{view}/t{{timestep}}/scores.csv", view=UNSUPERVISED_TOY_VIEWS
        ),
    output:
        csv=report(
            f"{TABLES}/toy_world_grounding_t{{timestep}}.csv",
            caption="../report/toy_world_summary.rst",
            category=report_category, subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/toy_world_grounding_t{{timestep}}.md",
        png=report(
            f"{FIGURES}/toy_world_per_layer_t{{timestep}}.png",
            caption="../report/toy_world_summary.rst",
            category=report_category, subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/toy_world_per_layer_t{{timestep}}.pdf",
    params:
        unsupervised=lambda wildcards, input: " ".join(f"--unsupervised {shlex.quote(path)}" for path in input.unsupervised),
    log:
        "logs/toy_world_summary_t{timestep}.log",
    benchmark:
        "results/benchmarks/toy_world_summary_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro toy-world-summary --trained {input.trained:q} --control {input.control:q}"
        " {params.unsupervised}"
        " --csv {output.csv:q} --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"
