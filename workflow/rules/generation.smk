# Generation analyses (issue 6): per-layer perturbation runs, fidelity scores, perturbation and guidance grids.
#
# Appendix Figs. 5, 7, 10: every (prompt, seed) of the fidelity prompts is generated once unperturbed ("none")
# and once per layer with that layer's I2T attention blurred ("perturb_l<layer>"), one job per run so that the
# layers spread over GPUs; one job per figure scores every run (CLIP-I, CLIP-T, DINO) against the unperturbed
# run, loading the CLIP and DINO backbones once. Figs. 18, 19: the caption prompts with one seed, per layer
# perturbed or with perturbed-I2T guidance, drawn as image grids.
# MAGNET (issue 15): appendix Fig. 20 draws the baseline's and the two MAGNET models' generations of its caption
# prompts (one seed per column, the same in every row); main Table 3 scores their generations of each prompt set
# with CLIPScore. A MAGNET model's runs apply its trained adapter (an input: rule magnet_train writes it).
#
# Config keys read:
#   analyses.generation: {prompts_file, n_prompts, seeds, cfg, guidance_scale, blur_sigma, blur_kernel,
#                         max_sequence_length, fidelity_layers, grid_layers, grid_seed, batch_size, fidelity,
#                         fig20_seed, clipscore}
#   appendix.models: {sd3, sd35, flux, sd3_magnet_coco, sd3_magnet_sa1b} (which configured model each figure uses)
#   models.<name>: {backbone, source, dtype, device, num_inference_steps, options.guidance_scale, toy, paper_name,
#                   lora}

include: "generation_common.smk"


rule generate_run:
    input:
        model=model_inputs,
        prompts=generation_prompt_inputs,
        adapter=generation_adapter_inputs,
    output:
        # The whole run folder (PNG images + manifest.json), so that Snakemake clears it before a re-run.
        directory("results/generation/{model}/{prompt_set}/{run}"),
    wildcard_constraints:
        prompt_set="fidelity|fig18|fig19|fig20|clipscore_pickapic|clipscore_coco|clipscore_sa1b",
        run=RUN_PATTERN,
    params:
        settings=generation_run_settings,
    message:
        "Generating the {wildcards.prompt_set} images of {wildcards.model}, run {wildcards.run}; writes {output}; progress in {log}"
    log:
        "logs/generate_run/{model}_{prompt_set}_{run}.log",
    benchmark:
        "results/benchmarks/generate_run/{model}_{prompt_set}_{run}.tsv"
    resources:
        mem_mb=lambda wildcards: 2000 if model_config(wildcards)["toy"] else 32000,
        runtime=model_runtime,
        gpu=model_uses_gpu,
        device=model_device,
        batch_size=GENERATION["batch_size"],
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro generate-run --settings {params.settings:q} --device {resources.device:q}"
        " --batch-size {resources.batch_size} --out {output:q} 2> {log:q}"


rule score_fidelity:
    input:
        runs=fidelity_runs,
        reference=fidelity_reference,
    output:
        "results/fidelity/{name}.csv",
    wildcard_constraints:
        name="|".join(FIDELITY_FIGURES),
    params:
        settings=fidelity_settings(),
        model=lambda wildcards: appendix_model(FIDELITY_FIGURES[wildcards.name]),
        # Only a toy model may be scored with random-weight backbones (the scorer refuses otherwise).
        toy=lambda wildcards: "--toy-model" if fidelity_model_is_toy(wildcards) else "",
    message:
        "Scoring CLIP-I, CLIP-T and DINO fidelity for {wildcards.name}; writes {output}; progress in {log}"
    log:
        "logs/score_fidelity/{name}.log",
    benchmark:
        "results/benchmarks/score_fidelity/{name}.tsv"
    resources:
        mem_mb=4000,
        gpu=int(GENERATION["fidelity"]["device"].startswith("cuda")),
        device=GENERATION["fidelity"]["device"],
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-fidelity --runs {input.runs:q} --reference {input.reference:q}"
        " --settings {params.settings:q} --model {params.model} {params.toy} --device {resources.device:q}"
        " --out {output:q} 2> {log:q}"


rule fidelity_figure:
    input:
        scores="results/fidelity/{name}.csv",
        reference=fidelity_reference,
    output:
        csv=report(
            f"{TABLES}/{{name}}.csv",
            caption="../report/fidelity_figure.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/{{name}}.md",
        png=report(
            f"{FIGURES}/{{name}}.png",
            caption="../report/fidelity_figure.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/{{name}}.pdf",
    wildcard_constraints:
        name="|".join(FIDELITY_FIGURES),
    params:
        role=lambda wildcards: FIDELITY_FIGURES[wildcards.name],
        figure=lambda wildcards: wildcards.name.split("_")[0],
        paper_name=lambda wildcards: config["models"][appendix_model(FIDELITY_FIGURES[wildcards.name])].get(
            "paper_name", "none"
        ),
    log:
        "logs/fidelity_figure/{name}.log",
    benchmark:
        "results/benchmarks/fidelity_figure/{name}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro fidelity-figure --scores {input.scores:q} --reference {input.reference:q}"
        " --role {params.role} --figure {params.figure} --paper-name {params.paper_name:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule generation_grid:
    input:
        reference=lambda wildcards: f"results/generation/{appendix_model('sd3')}/{GRID_FIGURES[wildcards.name][0]}/none",
        runs=grid_runs,
    output:
        png=report(
            f"{FIGURES}/{{name}}.png",
            caption="../report/generation_grid.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/{{name}}.pdf",
    wildcard_constraints:
        name="|".join(GRID_FIGURES),
    params:
        figure=lambda wildcards: GRID_FIGURES[wildcards.name][0],
        paper_name=config["models"][appendix_model("sd3")].get("paper_name", "none"),
        guidance_scale=GENERATION["guidance_scale"],
    log:
        "logs/generation_grid/{name}.log",
    benchmark:
        "results/benchmarks/generation_grid/{name}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro generation-grid --reference {input.reference:q} --runs {input.runs:q} --role sd3"
        " --figure {params.figure} --paper-name {params.paper_name:q} --png {output.png:q} --pdf {output.pdf:q}"
        " 2> {log:q}"


rule fig20_magnet_generations:
    input:
        runs=fig20_runs,
    output:
        png=report(
            f"{FIGURES}/fig20_magnet_generations.png",
            caption="../report/fig20_magnet_generations.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/fig20_magnet_generations.pdf",
    params:
        labels=" ".join(shlex.quote(label) for label in MAGNET_ROWS.values()),
        stand_in=magnet_stand_in(),
    log:
        "logs/fig20_magnet_generations.log",
    benchmark:
        "results/benchmarks/fig20_magnet_generations.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro magnet-grid --runs {input.runs:q} --labels {params.labels} --stand-in {params.stand_in:q}"
        " --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule score_clipscore:
    input:
        runs=[folder for _, folder in clipscore_runs()],
    output:
        "results/clipscore/main_table3.csv",
    params:
        runs=" ".join(shlex.quote(f"{name}={folder}") for name, folder in clipscore_runs()),
        settings=clipscore_settings(),
        models=" ".join(appendix_model(role) for role in MAGNET_ROWS),
        # Only toy models may be scored with a random-weight CLIP (the scorer refuses otherwise).
        toy="--toy-model" if clipscore_models_are_toy() else "",
    message:
        "Scoring CLIPScore of the baseline and MAGNET models' generations (main Table 3); writes {output}; progress in {log}"
    log:
        "logs/score_clipscore.log",
    benchmark:
        "results/benchmarks/score_clipscore.tsv"
    resources:
        mem_mb=6000,
        gpu=int(CLIPSCORE["device"].startswith("cuda")),
        device=CLIPSCORE["device"],
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-clipscore --runs {params.runs} --settings {params.settings:q} --models {params.models}"
        " {params.toy} --device {resources.device:q} --out {output:q} 2> {log:q}"


rule main_table3_clipscore:
    input:
        "results/clipscore/main_table3.csv",
    output:
        csv=report(
            f"{TABLES}/main_table3_clipscore.csv",
            caption="../report/main_table3_clipscore.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/main_table3_clipscore.md",
    params:
        roles=json.dumps({role: appendix_model(role) for role in MAGNET_ROWS}),
        prompt_sets=json.dumps(CLIPSCORE["prompt_sets"], sort_keys=True),
        stand_in=magnet_stand_in(),
    log:
        "logs/main_table3_clipscore.log",
    benchmark:
        "results/benchmarks/main_table3_clipscore.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro clipscore-table --scores {input:q} --roles {params.roles:q} --prompt-sets {params.prompt_sets:q}"
        " --stand-in {params.stand_in:q} --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"


rule fig01_drawbench_prompts:
    output:
        csv=f"{TABLES}/fig01_drawbench_prompts.csv",
        markdown=f"{TABLES}/fig01_drawbench_prompts.md",
        png=report(
            f"{FIGURES}/fig01_drawbench_prompts.png",
            caption="../report/fig01_drawbench_prompts.rst",
            category="Generation",
            subcategory="Analysis prompts",
        ),
        pdf=f"{FIGURES}/fig01_drawbench_prompts.pdf",
    params:
        usage=drawbench_usage(),
        title="Appendix Fig. 1: the 50 DrawBench prompts selected for the analyses",
    log:
        "logs/fig01_drawbench_prompts.log",
    benchmark:
        "results/benchmarks/fig01_drawbench_prompts.tsv"
    resources:
        mem_mb=500,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro prompts-figure --usage {params.usage:q} --title {params.title:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"
