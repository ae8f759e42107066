# The appendix's segmentation figures and tables under their paper names. `snakemake all_segmentation` builds
# them all; each file is also a target of its own.


rule all_segmentation:
    input:
        segmentation_appendix_targets(),
        table_pages(segmentation_appendix_targets()),


rule score_heads:
    input:
        dataset=prepared_manifest,
        model=model_inputs,
    output:
        "results/segmentation_heads/{model}/{dataset}/t{timestep}/per_head.csv",
    params:
        settings=extraction_settings,
        dataset_root=prepared_root,
    message:
        "Forward passes of {wildcards.model} on {wildcards.dataset} scoring every head (Fig. 4); writes {output}; progress in {log}"
    log:
        "logs/score_heads/{model}_{dataset}_t{timestep}.log",
    benchmark:
        "results/benchmarks/score_heads/{model}_{dataset}_t{timestep}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=model_uses_gpu,
        device=model_device,
        batch_size=forward_batch_size("score-heads"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro score-heads --settings {params.settings:q} --dataset-root {params.dataset_root:q}"
        " --out {output:q} --device {resources.device:q} --batch-size {resources.batch_size} 2> {log:q}"


rule fig04_head_miou:
    input:
        f"results/segmentation_heads/{appendix_model('sd3')}/{appendix_dataset('voc21')}/t{TIMESTEP}/per_head.csv",
    output:
        csv=f"{TABLES}/fig04_head_miou.csv",
        markdown=f"{TABLES}/fig04_head_miou.md",
        png=report(f"{FIGURES}/fig04_head_miou.png", caption="../report/fig04_head_miou.rst", category=report_category, subcategory=report_subcategory),
        pdf=f"{FIGURES}/fig04_head_miou.pdf",
    params:
        title=f"Appendix Fig. 4: mIoU per (layer, head), {stand_in('sd3', 'voc21')}",
    log:
        "logs/fig04_head_miou.log",
    benchmark:
        "results/benchmarks/fig04_head_miou.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro head-figure --scores {input:q} --title {params.title:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule fig02_timestep:
    input:
        tables=[
            f"{TABLES}/timestep_sweep_{appendix_model('sd3')}_{appendix_dataset(role)}.csv"
            for role in ("voc20", "coco_object")
        ],
        provenance=provenance_scores(("voc20", "coco_object")),
    output:
        csv=f"{TABLES}/fig02_timestep.csv",
        markdown=f"{TABLES}/fig02_timestep.md",
        png=report(f"{FIGURES}/fig02_timestep.png", caption="../report/fig02_timestep.rst", category=report_category, subcategory=report_subcategory),
        pdf=f"{FIGURES}/fig02_timestep.pdf",
    params:
        labels=[f"({panel}) {stand_in(None, role)}" for panel, role in (("a", "voc20"), ("b", "coco_object"))],
        title=f"Appendix Fig. 2: segmentation vs timestep, {stand_in('sd3')}, layer {config['models'][appendix_model('sd3')]['analysis_layer']}",
    log:
        "logs/fig02_timestep.log",
    benchmark:
        "results/benchmarks/fig02_timestep.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro timestep-panels --tables {input.tables:q} --provenance {input.provenance:q} --labels {params.labels:q} --title {params.title:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule tab01_normalisation:
    input:
        tables=[
            f"{TABLES}/normalisation_{appendix_model('sd3')}_{appendix_dataset(role)}_t{TIMESTEP}.csv"
            for role in ("voc20", "coco_object")
        ],
        provenance=provenance_scores(("voc20", "coco_object")),
    output:
        csv=report(f"{TABLES}/tab01_normalisation.csv", caption="../report/tab01_normalisation.rst",
                   category=report_category, subcategory=report_subcategory),
        markdown=f"{TABLES}/tab01_normalisation.md",
    params:
        labels=[stand_in(None, role) for role in ("voc20", "coco_object")],
        title=f"Appendix Table 1: score normalisation, {stand_in('sd3')}, t = {TIMESTEP}",
    log:
        "logs/tab01_normalisation.log",
    benchmark:
        "results/benchmarks/tab01_normalisation.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro normalisation-panels --tables {input.tables:q} --provenance {input.provenance:q} --labels {params.labels:q} --title {params.title:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"


rule appendix_per_layer:
    input:
        lambda wildcards: "results/segmentation/{model}/{dataset}/t{timestep}/per_layer.csv".format(
            model=appendix_model(PER_LAYER_FIGURES[wildcards.figure][0]),
            dataset=appendix_dataset(PER_LAYER_FIGURES[wildcards.figure][1]),
            timestep=TIMESTEP,
        ),
    output:
        csv=f"{TABLES}/{{figure}}.csv",
        markdown=f"{TABLES}/{{figure}}.md",
        png=report(f"{FIGURES}/{{figure}}.png", caption="../report/appendix_per_layer.rst", category=report_category, subcategory=report_subcategory),
        pdf=f"{FIGURES}/{{figure}}.pdf",
    wildcard_constraints:
        figure="|".join(PER_LAYER_FIGURES),
    params:
        paper_model=lambda wildcards: PAPER_MODEL_KEYS[PER_LAYER_FIGURES[wildcards.figure][0]],
        paper_dataset=lambda wildcards: paper_dataset_key(PER_LAYER_FIGURES[wildcards.figure][1]),
        backbone=lambda wildcards: per_layer_figure_model(wildcards.figure)["backbone"],
        model_source=lambda wildcards: per_layer_figure_model(wildcards.figure)["source"],
        title=lambda wildcards: "{}: per-layer segmentation, {}".format(
            PER_LAYER_FIGURES[wildcards.figure][2], stand_in(*PER_LAYER_FIGURES[wildcards.figure][:2])
        ),
    log:
        "logs/appendix_per_layer/{figure}.log",
    benchmark:
        "results/benchmarks/appendix_per_layer/{figure}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro appendix-per-layer --scores {input:q} --paper-model {params.paper_model}"
        " --paper-dataset {params.paper_dataset} --backbone {params.backbone} --model-source {params.model_source:q}"
        " --title {params.title:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule appendix_overlays:
    input:
        cache=overlay_cache,
        dataset=lambda wildcards: overlay_dataset_root(wildcards) / "manifest.json",
    output:
        png=report(f"{FIGURES}/{{figure}}.png", caption="../report/appendix_overlays.rst", category=report_category, subcategory=report_subcategory),
        pdf=f"{FIGURES}/{{figure}}.pdf",
    wildcard_constraints:
        figure="|".join(OVERLAY_FIGURES),
    params:
        dataset_root=overlay_dataset_root,
        mode=lambda wildcards: OVERLAY_FIGURES[wildcards.figure][0],
        layer=config["models"][appendix_model("sd3")]["analysis_layer"],
        n=config["analyses"]["overlays"]["images"],
        kl_threshold=config["analyses"]["unsupervised"]["kl_threshold"],
        title=lambda wildcards: "{}: {} overlays, {}, layer {}".format(
            OVERLAY_FIGURES[wildcards.figure][2],
            "open-vocabulary" if OVERLAY_FIGURES[wildcards.figure][0] == "ovss" else "unsupervised",
            stand_in("sd3", OVERLAY_FIGURES[wildcards.figure][1]),
            config["models"][appendix_model("sd3")]["analysis_layer"],
        ),
    message:
        "Forward passes for the overlays of {wildcards.figure}; writes {output}; progress in {log}"
    log:
        "logs/appendix_overlays/{figure}.log",
    benchmark:
        "results/benchmarks/appendix_overlays/{figure}.tsv"
    resources:
        mem_mb=2000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro overlays --cache {input.cache:q} --dataset-root {params.dataset_root:q} --layer {params.layer}"
        " --n {params.n} --mode {params.mode} --kl-threshold {params.kl_threshold} --title {params.title:q}"
        " --png {output.png:q} --pdf {output.pdf:q} 2> {log:q}"


rule main_table:
    input:
        lambda wildcards: [entry["path"] for entry in main_table_entries(wildcards.table)],
    output:
        csv=report(f"{TABLES}/{{table}}.csv", caption="../report/main_tables.rst", category=report_category, subcategory=report_subcategory),
        markdown=f"{TABLES}/{{table}}.md",
    wildcard_constraints:
        table="|".join(MAIN_TABLES),
    params:
        kind=lambda wildcards: MAIN_TABLES[wildcards.table][0],
        entries=lambda wildcards: json.dumps(main_table_entries(wildcards.table)),
        title=lambda wildcards: main_table_title(wildcards.table),
    log:
        "logs/main_table/{table}.log",
    benchmark:
        "results/benchmarks/main_table/{table}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro main-table --kind {params.kind} --entries {params.entries:q} --title {params.title:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"
