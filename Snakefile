# seg4diff-repro: the appendix analyses of Seg4Diff as one Snakemake workflow.
# `snakemake --cores 2` builds what config.yaml's `run` asks for (by default the offline toy world).

from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/toy_model.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/appendix_common.smk"
include: "workflow/rules/segmentation_appendix.smk"
include: "workflow/rules/generation.smk"
include: "workflow/rules/attention_figures.smk"
include: "workflow/rules/magnet_common.smk"
include: "workflow/rules/magnet.smk"
include: "workflow/rules/magnet_eval.smk"


# On a cluster these run where Snakemake runs (the login node), not as jobs: the cheap tables and figures, and
# the downloads, which need the internet that compute nodes may lack (the GPU jobs wait for them). The gathering
# of extraction shards is local too (`localrule: True` in its rules).
localrules:
    download_dataset_archive,
    per_layer_table,
    per_layer_figure,
    timestep_sweep,
    normalisation_table,
    unsupervised_table,
    toy_world_summary,
    fig04_head_miou,
    fig02_timestep,
    tab01_normalisation,
    appendix_per_layer,
    main_table,
    toy_world_magnet,
    fidelity_figure,
    generation_grid,
    value_norm_heads_figure,
    value_norm_layers_figure,
    fig01_drawbench_prompts,
    fig20_magnet_generations,
    main_table3_clipscore,


report: "workflow/report/workflow.rst"


# Local runs: the jobs' `seg4diff-repro` commands run in processes forked from one interpreter that has imported
# torch, diffusers and the plotting libraries once (src/seg4diff_repro/fork_server.py), which saves each job their
# 2-10 s of imports. Its log: logs/fork_server.log. SEG4DIFF_FORK_SERVER=off runs every job in its own process.
onstart:
    if workflow.local_exec and not workflow.deployment_settings.deployment_method:
        FORK_SERVER["socket"] = start_server(
            Path("logs/fork_server.log"), parent_pid=os.getpid(), env=job_environment()
        )
        if FORK_SERVER["socket"]:
            os.environ[SERVER_ENV] = FORK_SERVER["socket"]


onsuccess:
    stop_server(FORK_SERVER.pop("socket", None))


onerror:
    stop_server(FORK_SERVER.pop("socket", None))


ALL_TARGETS = list(dict.fromkeys([
    *run_targets(),
    *timestep_sweep_targets(),  # Fig. 2's sweep pairs too
    *toy_world_targets(),
    *segmentation_appendix_targets(),
    *generation_targets(),
    *attention_figure_targets(),
    *toy_world_magnet_targets(),
]))


rule all:
    input:
        ALL_TARGETS,
        table_pages(ALL_TARGETS),  # for `snakemake --report`
    default_target: True


# The analyses of the models and datasets in `run` only (no appendix roles, no toy world): what a run on one
# real model needs, e.g. `snakemake all_run --config run='{models: [sd3_medium], datasets: [voc20]}'`.
rule all_run:
    input:
        run_targets(),
        table_pages(run_targets()),


rule all_generation:
    input:
        generation_targets(),
        attention_figure_targets(),
        table_pages(generation_targets() + attention_figure_targets()),


# After `rule all`, whose targets the bundle packs.
include: "workflow/rules/verify.smk"


# Every rule that runs the package gets the fingerprint of the code its command runs as a parameter,
# so that Snakemake re-runs it (and what depends on it) when that code changes; `snakemake -n` shows why.
add_code_fingerprints(workflow.rules)
