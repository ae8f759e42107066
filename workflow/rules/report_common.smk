# Where each output sits in `snakemake --report`: under the paper item it reproduces (report_category and
# report_subcategory, used by every rule's report() outputs), and the report pages a target list needs.

# Outputs named after a paper item: (category, subcategory). Numbers are zero-padded so that the report,
# which sorts by name, lists them in the paper's order.
PAPER_ITEMS = {
    "main_fig08_per_layer_sd3": ("Main paper", "Fig. 08: per-layer scores, SD3"),
    "main_table1_ovss": ("Main paper", "Table 1: open-vocabulary segmentation"),
    "main_table2_unsupervised": ("Main paper", "Table 2: unsupervised segmentation"),
    "main_table3_clipscore": ("Main paper", "Table 3: CLIPScore, baseline vs MAGNET"),
    "tab01_normalisation": ("Appendix", "Table 1: score normalisation"),
    "fig01_drawbench_prompts": ("Appendix", "Fig. 1: the 50 DrawBench prompts"),
    "fig02_timestep": ("Appendix", "Fig. 02: timestep sweep"),
    "fig03_i2t_t2i_sd3": ("Appendix", "Fig. 03: I2T vs T2I maps"),
    "fig04_head_miou": ("Appendix", "Fig. 04: mIoU per head"),
    "fig05_fidelity_sd3": ("Appendix", "Fig. 05: fidelity under perturbation, SD3"),
    "fig06_value_norms_sd35": ("Appendix", "Fig. 06: value norms, SD3.5"),
    "fig07_fidelity_sd35": ("Appendix", "Fig. 07: fidelity under perturbation, SD3.5"),
    "fig08_per_layer_sd35": ("Appendix", "Fig. 08: per-layer scores, SD3.5"),
    "fig09_value_norms_flux": ("Appendix", "Fig. 09: value norms, Flux"),
    "fig10_fidelity_flux": ("Appendix", "Fig. 10: fidelity under perturbation, Flux"),
    "fig11_per_layer_flux": ("Appendix", "Fig. 11: per-layer scores, Flux"),
    "fig12_token_maps_sd3": ("Appendix", "Fig. 12: maps of every prompt token"),
    "fig13_head_maps_sd3": ("Appendix", "Fig. 13: head maps"),
    "fig14_head_maps_sd3": ("Appendix", "Fig. 14: head maps"),
    "fig15_value_norms_heads_sd3": ("Appendix", "Fig. 15: value norms per head, SD3"),
    "fig16_pca_qkv_sd3": ("Appendix", "Fig. 16: PCA of q, k, v"),
    "fig17_null_token_maps_sd3": ("Appendix", "Fig. 17: token maps of the empty prompt"),
    "fig18_perturbation_grid": ("Appendix", "Fig. 18: perturbation grid"),
    "fig19_guidance_grid": ("Appendix", "Fig. 19: perturbed-I2T guidance grid"),
    "fig20_magnet_generations": ("Appendix", "Fig. 20: generations of the MAGNET models"),
    "fig21_ovss_coco_object": ("Appendix", "Fig. 21: open-vocabulary overlays, COCO-Object"),
    "fig22_ovss_pc59": ("Appendix", "Fig. 22: open-vocabulary overlays, PC59"),
    "fig23_ovss_ade150": ("Appendix", "Fig. 23: open-vocabulary overlays, ADE150"),
    "fig24_unsupervised_coco_object": ("Appendix", "Fig. 24: unsupervised overlays, COCO-Object"),
    "fig25_unsupervised_voc21": ("Appendix", "Fig. 25: unsupervised overlays, VOC21"),
    "fig26_unsupervised_ade150": ("Appendix", "Fig. 26: unsupervised overlays, ADE150"),
}
# Outputs per run model and dataset (and the toy world's), by file-name prefix.
ANALYSIS_ITEMS = {
    "per_layer_": ("Per model and dataset", "Per-layer scores"),
    "timestep_sweep_": ("Per model and dataset", "Timestep sweep"),
    "normalisation_": ("Per model and dataset", "Score normalisation"),
    "unsupervised_": ("Per model and dataset", "Unsupervised segmentation"),
    "toy_world_magnet": ("Toy world", "MAGNET vs the base model"),  # before the prefix below, which it also has
    "toy_world_": ("Toy world", "Trained model vs random control"),
    "toy_generations": ("Toy world", "Generations"),
    "run_info": ("This run", "Commit and configuration"),
}


def paper_item(stem):
    """(category, subcategory) of the report for an output named `stem`."""
    if stem in PAPER_ITEMS:
        return PAPER_ITEMS[stem]
    for prefix, item in ANALYSIS_ITEMS.items():
        if stem.startswith(prefix):
            return item
    raise ValueError(f"output {stem!r} has no place in the report: add it to PAPER_ITEMS or ANALYSIS_ITEMS")


def report_category(wildcards, output):
    return paper_item(Path(output[0]).stem)[0]


def report_subcategory(wildcards, output):
    return paper_item(Path(output[0]).stem)[1]


def table_pages(targets):
    """The report page of every table (paper_tables/<stem>.csv or .md) among `targets`."""
    stems = dict.fromkeys(Path(t).stem for t in targets if Path(t).parts[0] == "paper_tables")
    return [f"{REPORT_PAGES}/tables/{stem}.html" for stem in stems] + [f"{REPORT_PAGES}/run_info.html"]
