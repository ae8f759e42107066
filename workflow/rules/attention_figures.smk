# Attention figures from generation (issue 6): value norms (appendix Figs. 6, 9, 15), PCA of q/k/v (Fig. 16) and
# token maps (Figs. 3, 12-14, 17), recorded while the stock pipelines generate, on the appendix roles' models.

include: "attention_figures_common.smk"


rule value_norms:
    input:
        model=model_inputs,
    output:
        per_head="results/value_norms/{model}/per_head.csv",
        per_layer="results/value_norms/{model}/per_layer.csv",
    params:
        settings=lambda wildcards: generation_model_settings(wildcards.model),
        prompts=(
            f"--prompts {ATTENTION_FIGURES['n_prompts']}" if ATTENTION_FIGURES["n_prompts"] is not None else ""
        ),
        timesteps=" ".join(str(k) for k in ATTENTION_FIGURES["timesteps"]),
        cfg=ATTENTION_FIGURES["cfg"],
        seed=ATTENTION_FIGURES["seed"],
        step_convention=ATTENTION_FIGURES["step_convention"],
    message:
        "Generating with {wildcards.model} and recording value norms; writes {output}; progress in {log}"
    log:
        "logs/value_norms/{model}.log",
    benchmark:
        "results/benchmarks/value_norms/{model}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=lambda wildcards: uses_gpu(wildcards.model),
        device=lambda wildcards: device_of(wildcards.model),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro value-norms --model-settings {params.settings:q} --device {resources.device:q} {params.prompts}"
        " --timesteps {params.timesteps} --cfg {params.cfg} --seed {params.seed}"
        " --step-convention {params.step_convention}"
        " --per-head {output.per_head:q} --per-layer {output.per_layer:q} 2> {log:q}"


rule value_norm_heads_figure:
    input:
        f"results/value_norms/{appendix_model('sd3')}/per_head.csv",
    output:
        csv=report(
            f"{TABLES}/fig15_value_norms_heads_sd3.csv",
            caption="../report/value_norms.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/fig15_value_norms_heads_sd3.md",
        png=report(
            f"{FIGURES}/fig15_value_norms_heads_sd3.png",
            caption="../report/value_norms.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/fig15_value_norms_heads_sd3.pdf",
    log:
        "logs/value_norm_heads_figure/fig15_value_norms_heads_sd3.log",
    benchmark:
        "results/benchmarks/value_norm_heads_figure/fig15_value_norms_heads_sd3.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro value-norm-heads-figure --per-head {input:q} --role sd3 --csv {output.csv:q}"
        " --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule value_norm_layers_figure:
    input:
        value_norm_layers_input,
    output:
        csv=report(
            f"{TABLES}/{{stem}}.csv",
            caption="../report/value_norms.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/{{stem}}.md",
        png=report(
            f"{FIGURES}/{{stem}}.png",
            caption="../report/value_norms.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/{{stem}}.pdf",
    wildcard_constraints:
        stem="|".join(VALUE_NORM_LAYER_FIGURES),
    params:
        role=lambda wildcards: VALUE_NORM_LAYER_FIGURES[wildcards.stem][0],
        number=lambda wildcards: VALUE_NORM_LAYER_FIGURES[wildcards.stem][1],
    log:
        "logs/value_norm_layers_figure/{stem}.log",
    benchmark:
        "results/benchmarks/value_norm_layers_figure/{stem}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro value-norm-layers-figure --per-layer {input:q} --role {params.role}"
        " --figure-number {params.number} --csv {output.csv:q} --markdown {output.markdown:q}"
        " --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule pca_qkv_figure:
    input:
        model=role_model_inputs("sd3"),
    output:
        png=report(
            f"{FIGURES}/fig16_pca_qkv_sd3.png",
            caption="../report/pca_qkv.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/fig16_pca_qkv_sd3.pdf",
    params:
        settings=generation_model_settings(appendix_model("sd3"), "sd3"),
        timestep=ATTENTION_FIGURES["map_timestep"],
        cfg=ATTENTION_FIGURES["cfg"],
        seed=ATTENTION_FIGURES["seed"],
        step_convention=ATTENTION_FIGURES["step_convention"],
    message:
        "Generating with the sd3 role's model and recording q, k, v for the PCA figure; writes {output}; progress in {log}"
    log:
        "logs/pca_qkv_figure/fig16_pca_qkv_sd3.log",
    benchmark:
        "results/benchmarks/pca_qkv_figure/fig16_pca_qkv_sd3.tsv"
    resources:
        mem_mb=gpu_job_scale(appendix_model("sd3"))["mem_mb"],
        runtime=gpu_job_scale(appendix_model("sd3"))["runtime"],
        gpu=uses_gpu(appendix_model("sd3")),
        device=device_of(appendix_model("sd3")),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro pca-qkv-figure --model-settings {params.settings:q} --device {resources.device:q}"
        " --timestep {params.timestep} --cfg {params.cfg} --seed {params.seed} --step-convention {params.step_convention}"
        " --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule token_maps_figure:
    input:
        model=role_model_inputs("sd3"),
    output:
        png=report(
            f"{FIGURES}/{{stem}}.png",
            caption="../report/token_maps.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        pdf=f"{FIGURES}/{{stem}}.pdf",
    wildcard_constraints:
        stem="|".join(TOKEN_MAP_FIGURES),
    params:
        settings=generation_model_settings(appendix_model("sd3"), "sd3"),
        figure=lambda wildcards: TOKEN_MAP_FIGURES[wildcards.stem],
        keywords=lambda wildcards: json.dumps(
            {
                "fig03": ATTENTION_FIGURES["keywords_fig03"],
                "fig13": ATTENTION_FIGURES["keywords_head_maps"],
                "fig14": ATTENTION_FIGURES["keywords_head_maps"],
            }.get(TOKEN_MAP_FIGURES[wildcards.stem])
        ),
        layers=json.dumps(ATTENTION_FIGURES["head_map_layers"]),
        timestep=ATTENTION_FIGURES["map_timestep"],
        cfg=ATTENTION_FIGURES["cfg"],
        seed=ATTENTION_FIGURES["seed"],
        step_convention=ATTENTION_FIGURES["step_convention"],
    message:
        "Generating with the sd3 role's model and recording token maps for {wildcards.stem}; writes {output}; progress in {log}"
    log:
        "logs/token_maps_figure/{stem}.log",
    benchmark:
        "results/benchmarks/token_maps_figure/{stem}.tsv"
    resources:
        mem_mb=gpu_job_scale(appendix_model("sd3"))["mem_mb"],
        runtime=gpu_job_scale(appendix_model("sd3"))["runtime"],
        gpu=uses_gpu(appendix_model("sd3")),
        device=device_of(appendix_model("sd3")),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro token-maps-figure --model-settings {params.settings:q} --device {resources.device:q} --figure {params.figure}"
        " --keywords {params.keywords:q} --layers {params.layers:q} --timestep {params.timestep}"
        " --cfg {params.cfg} --seed {params.seed} --step-convention {params.step_convention}"
        " --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"
