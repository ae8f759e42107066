# MAGNET's evaluation (issue 15): a trained adapter is a model variant (`models.<name>.lora: <run>`), so every
# segmentation target accepts it (its jobs apply the adapter after loading; the adapter folder is their input).
# The "+ MAGNET" rows of the main tables come from the appendix roles sd3_magnet_sa1b and sd3_magnet_coco; this file
# adds the toy world's table of MAGNET's effect on the supervised layer (helpers in appendix_common.smk).


rule toy_world_magnet:
    input:
        # on the VOC20 stand-in view (toy_objects in config.yaml: the objects the runs train on, background dropped)
        base=f"results/segmentation/{appendix_model('sd3')}/{appendix_dataset('voc20')}/t{{timestep}}/per_layer.csv",
        variants=[
            f"results/segmentation/{model}/{appendix_dataset('voc20')}/t{{timestep}}/per_layer.csv"
            for model in magnet_role_models()
        ],
        adapters=[model_lora_folder(model) for model in magnet_role_models()],
    output:
        csv=report(
            f"{TABLES}/toy_world_magnet_t{{timestep}}.csv",
            caption="../report/toy_world_magnet.rst",
            category=report_category, subcategory=report_subcategory,
        ),
        markdown=f"{TABLES}/toy_world_magnet_t{{timestep}}.md",
    params:
        layer=lambda wildcards: magnet_supervised_layer(),
        title=lambda wildcards: (
            f"Toy world: MAGNET's effect on the supervised layer, {appendix_model('sd3')} and its variants "
            f"{', '.join(magnet_role_models())} on {appendix_dataset('voc20')} (oracle prompt, t = {wildcards.timestep} of "
            f"{config['models'][appendix_model('sd3')]['num_inference_steps']})"
        ),
    log:
        "logs/toy_world_magnet_t{timestep}.log",
    benchmark:
        "results/benchmarks/toy_world_magnet_t{timestep}.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro magnet-effect-table --base {input.base:q} --variants {input.variants:q}"
        " --adapters {input.adapters:q} --layer {params.layer} --title {params.title:q}"
        " --csv {output.csv:q} --markdown {output.markdown:q} 2> {log:q}"
