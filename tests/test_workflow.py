"""The Snakemake workflow itself: config errors at DAG build, an end-to-end toy run, re-runs, report, lint."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from magnet_adapters import plan_adapters

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The trained toy model's layer that the shared toy run (conftest.py) perturbs: its grounding layer (config.yaml's
# analysis_layer), where a perturbation changes the images most (at layer 0 by at most 6 grey levels).
TEST_SD3_LAYER = 5


def generation_steps(workdir: Path) -> int:
    """The sampling steps the workdir's config sets for the generation analyses (`analyses.generation.steps`)."""
    steps = yaml.safe_load((workdir / "config.yaml").read_text())["analyses"]["generation"]["steps"]
    assert isinstance(steps, int), "the toy config sets the generation steps"
    return steps


def snakemake(workdir: Path, *args: str, check: bool = True, cores: str | None = "2",
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; ``cores=None`` leaves the core count to the workflow's default profile.

    Generous time limit: the default toy run takes about 8 minutes alone on 2 cores, and CI machines are shared.
    """
    env = {**(os.environ if env is None else env), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *(["--cores", cores] if cores else []), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=2700,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def toy_layers() -> list[int]:
    """The joint layers of the committed toy model (and of its random control, built at the same sizes)."""
    return list(range(json.loads((REPO / "models/toy_sd3/transformer/config.json").read_text())["num_layers"]))


def run_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config.yaml").read_text())


def planned_jobs(dry_run: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the job-stats table of a dry run."""
    table = dry_run.stdout.split("Job stats:")[1].split("total")[0]
    return {match.group(1) for match in re.finditer(r"^(\w+)\s+\d+\s*$", table, flags=re.MULTILINE)}


def copy_workflow(target: Path, **overrides) -> Path:
    for name in ("Snakefile", "workflow", "envs", "models", "profiles"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / name)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["toy_world"].update(n_train=2, n_val=6)
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)  # a section config.yaml leaves to the schema's defaults, too
    write_config(target, config)
    return target


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def edit_config(workdir: Path, section: str, **values) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[section].update(values)
    write_config(workdir, config)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["toy_sd3", "toy_sd3_random"])
def test_default_run_leaves_table_and_figure(toy_run, model):
    stem = f"per_layer_{model}_toy_objects_t8"
    table = pd.read_csv(toy_run / "paper_tables/toy" / f"{stem}.csv")
    assert table["layer"].tolist() == toy_layers()
    assert table[["pACC", "mACC", "mIoU"]].apply(lambda column: column.between(0, 100)).all().all()
    assert "paper_mIoU" in table.columns and table["paper_mIoU"].isna().all()  # the paper has no toy numbers
    markdown = (toy_run / "paper_tables/toy" / f"{stem}.md").read_text()
    assert "seed = 0" in markdown and "prompt = oracle" in markdown
    assert (toy_run / "figures/toy" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (toy_run / "figures/toy" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    for log in ("prepare_toy_world_objects.log", f"score_layers/{stem[len('per_layer_'):]}.log"):
        assert (toy_run / "logs" / log).is_file(), log
    # The t = 8 cache comes from the model's own extraction job, or from its timestep-sweep job when it has one.
    extraction_logs = (f"extract_attention/{stem[len('per_layer_'):]}.log",
                       f"extract_attention_sweep/{model}_toy_objects.log")
    assert any((toy_run / "logs" / log).is_file() for log in extraction_logs), extraction_logs


@pytest.mark.slow
def test_default_run_leaves_the_toy_world_summary_and_generations(toy_run):
    trained = pd.read_csv(toy_run / "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv")
    control = pd.read_csv(toy_run / "paper_tables/toy/per_layer_toy_sd3_random_toy_objects_t8.csv")
    summary = pd.read_csv(toy_run / "paper_tables/toy/toy_world_grounding_t8.csv")
    assert summary.loc[0, "best_mIoU"] == pytest.approx(trained["mIoU"].max(), abs=0.01)
    assert summary.loc[1, "best_mIoU"] == pytest.approx(control["mIoU"].max(), abs=0.01)
    # The committed toy model grounds its class words best at its analysis layer, an interior one. On the 6 images
    # of this run the margins are smaller than the default run's 64 give (+27 over the control, +29 over the median).
    analysis_layer = run_config(toy_run)["models"]["toy_sd3"]["analysis_layer"]
    assert trained.loc[trained["mIoU"].idxmax(), "layer"] == analysis_layer
    assert analysis_layer not in (toy_layers()[0], toy_layers()[-1])
    assert trained["mIoU"].max() - control["mIoU"].max() >= 5
    assert trained["mIoU"].max() - trained["mIoU"].median() >= 10
    assert (toy_run / "figures/toy/toy_world_per_layer_t8.png").read_bytes()[:4] == b"\x89PNG"
    assert (toy_run / "figures/toy/toy_generations.png").read_bytes()[:4] == b"\x89PNG"
    assert (toy_run / "logs/build_tiny_model/toy_sd3_random.log").is_file()
    assert not (toy_run / "logs/toy_model.log").exists()  # the committed model is used, not retrained


@pytest.mark.slow
def test_default_run_leaves_the_sweep_normalisation_and_unsupervised_tables(toy_run):
    sweep = pd.read_csv(toy_run / "paper_tables/toy/timestep_sweep_toy_sd3_toy_objects.csv")
    assert sweep["timestep_k"].tolist() == [1, 4, 8, 14, 20, 28]
    per_layer = pd.read_csv(toy_run / "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv")
    at_k8 = sweep.set_index("timestep_k").loc[8]
    analysis_layer = run_config(toy_run)["models"]["toy_sd3"]["analysis_layer"]  # the sweep scores this layer
    assert at_k8["mIoU"] == pytest.approx(per_layer.set_index("layer").loc[analysis_layer, "mIoU"], abs=0.01)
    normalisation = pd.read_csv(toy_run / "paper_tables/toy/normalisation_toy_sd3_toy_objects_t8.csv")
    assert len(normalisation) == 4
    post_raw = normalisation[(normalisation["post_softmax"]) & (~normalisation["min_max"])]
    assert post_raw["mIoU"].iloc[0] == pytest.approx(at_k8["mIoU"], abs=0.01)  # the default scoring
    unsupervised = pd.read_csv(toy_run / "paper_tables/toy/unsupervised_toy_sd3_toy_stuff_t8.csv")
    assert unsupervised["layer"].tolist() == [analysis_layer] and unsupervised["mean_proposals"].iloc[0] >= 1
    assert 0 <= unsupervised["mIoU"].iloc[0] <= 100
    # Both Hungarian matchings, labelled; the headline one is the official per-row matching.
    assert unsupervised["mIoU"].iloc[0] == unsupervised["mIoU (official, per-row matching)"].iloc[0]
    assert 0 <= unsupervised["mIoU (corrected, per-image)"].iloc[0] <= 100
    pre = normalisation[~normalisation["post_softmax"]]["mIoU"]
    assert not pre.round(2).isin(normalisation[normalisation["post_softmax"]]["mIoU"].round(2)).all()


@pytest.mark.slow
def test_default_run_leaves_the_appendix_segmentation_targets(toy_run):
    heads = pd.read_csv(toy_run / "paper_tables/toy/fig04_head_miou.csv")
    assert heads["layer"].tolist() == toy_layers()
    head_columns = [c for c in heads.columns if c.startswith("head_")]
    assert len(head_columns) == 4 and heads[head_columns].apply(lambda c: c.between(0, 100)).all().all()
    assert "toy_sd3 for SD3-medium on toy_objects_bg_last for VOC21" in (toy_run / "paper_tables/toy/fig04_head_miou.md").read_text()
    main1 = pd.read_csv(toy_run / "paper_tables/toy/main_table1_ovss.csv")
    # 3 models and the two "+ MAGNET" rows x the paper's 5 columns
    assert len(main1) == 5 * 5 and main1["paper_mIoU"].notna().all()
    assert main1["diff_mIoU"].round(2).equals((main1["mIoU"] - main1["paper_mIoU"]).round(2))
    per_layer = pd.read_csv(toy_run / "paper_tables/toy/per_layer_toy_sd3_toy_objects_t8.csv").set_index("layer")
    config = run_config(toy_run)
    assert main1.loc[0, "mIoU"] == pytest.approx(per_layer.loc[config["models"]["toy_sd3"]["analysis_layer"], "mIoU"],
                                                 abs=0.01)
    main2 = pd.read_csv(toy_run / "paper_tables/toy/main_table2_unsupervised.csv")
    assert set(main2["model"]) == {"toy_sd3", "toy_sd35_random", "toy_sd3_magnet_sa1b", "toy_sd3_magnet_coco"}
    assert main2["paper_mIoU"].notna().all()
    tau = config["analyses"]["unsupervised"]["kl_threshold"]
    assert len(main2) == 4 * 6 and (main2["kl_threshold"] == tau).all()  # the paper's 6 columns, tau per row
    fig02 = pd.read_csv(toy_run / "paper_tables/toy/fig02_timestep.csv")
    assert fig02["panel"].nunique() == 2
    assert "seed = 0" in (toy_run / "paper_tables/toy/tab01_normalisation.md").read_text()
    for stem in ("fig02_timestep", "fig04_head_miou", "main_fig08_per_layer_sd3", "fig08_per_layer_sd35",
                 "fig11_per_layer_flux", "fig21_ovss_coco_object", "fig22_ovss_pc59", "fig23_ovss_ade150",
                 "fig24_unsupervised_coco_object", "fig25_unsupervised_voc21", "fig26_unsupervised_ade150"):
        assert (toy_run / "figures/toy" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
        assert (toy_run / "figures/toy" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem
    flux = pd.read_csv(toy_run / "paper_tables/toy/fig11_per_layer_flux.csv")
    assert len(flux) == 4  # the tiny Flux: 2 double-stream + 2 single-stream layers


@pytest.mark.slow
def test_scoring_change_reruns_scoring_not_the_cache(toy_run):
    nothing = snakemake(toy_run, "-n")
    assert "Nothing to be done" in nothing.stdout + nothing.stderr
    edit_config(toy_run, "segmentation", norm_after_merge=True)
    assert planned_jobs(snakemake(toy_run, "-n")) == {
        "score_layers", "per_layer_table", "per_layer_figure", "toy_world_summary", "toy_world_magnet", "timestep_sweep", "all",
        "appendix_per_layer", "fig02_timestep", "tab01_normalisation", "main_table",
        "run_info", "table_page",  # the report's record of the config, and the table pages that quote the settings
    }
    edit_config(toy_run, "attention", seed=1)
    assert "extract_attention" in planned_jobs(snakemake(toy_run, "-n"))
    edit_config(toy_run, "attention", seed=0)
    edit_config(toy_run, "segmentation", norm_after_merge=False)


def dry_run_counts(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that `snakemake -n` plans; {} for "Nothing to be done"."""
    result = snakemake(workdir, "-n", *args)
    return {} if "Nothing to be done" in result.stdout + result.stderr else job_counts(result.stdout)


# What depends on toy_sd3_random's weights in the default DAG: its t = 8 sweep (6 timesteps) and the empty-prompt caches
# of the two unsupervised views, their scorings (4 normalisation variants), tables, figure, the toy-world summary and 6
# report pages.
NEW_WEIGHTS_JOBS = {
    "build_tiny_model": 1, "extract_attention_sweep_shard": 1, "extract_attention_sweep": 1,
    "extract_unsupervised_attention_shard": 2, "extract_unsupervised_attention": 2, "score_layers": 6,
    "score_normalisation_variant": 4, "score_unsupervised": 2, "per_layer_table": 1, "per_layer_figure": 1,
    "normalisation_table": 1, "timestep_sweep": 1, "unsupervised_table": 2, "toy_world_summary": 1, "table_page": 6,
    "run_info": 1, "all": 1,
}
# What depends on the toy world's datasets (toy_world.seed changes all four presets): every cache of every view of them
# (13 t = 8 and 3 sweep caches, Fig. 2's COCO-Object stand-in among the sweeps, 18 empty-prompt ones), their scorings,
# tables and figures, the appendix targets, the head scoring and the toy generations' figure; not the models, nor the
# generation analyses (DrawBench prompts).
NEW_DATA_JOBS = {
    "prepare_toy_world": 4, "extract_attention_shard": 13, "extract_attention": 13, "extract_attention_sweep_shard": 3,
    "extract_attention_sweep": 3, "extract_unsupervised_attention_shard": 18, "extract_unsupervised_attention": 18,
    "score_heads": 1, "toy_generations": 1, "fig04_head_miou": 1, "appendix_overlays": 6, "score_layers": 31,
    "score_normalisation_variant": 12, "score_unsupervised": 18, "table_page": 22, "appendix_per_layer": 3,
    "main_table": 2, "normalisation_table": 3, "per_layer_table": 2, "timestep_sweep": 3, "unsupervised_table": 4,
    "fig02_timestep": 1, "per_layer_figure": 2, "tab01_normalisation": 1, "toy_world_summary": 1, "run_info": 1,
    "all": 1,
    # MAGNET: the toy adapters train on the objects preset, so they, their variants' generations (Fig. 20, Table 3) and the
    # toy MAGNET table follow (the variants' caches are counted above: 4 t = 8 and 6 empty-prompt ones).
    "magnet_train": 2, "generate_run": 8, "fig20_magnet_generations": 1, "score_clipscore": 1,
    "main_table3_clipscore": 1, "toy_world_magnet": 1,
}


@pytest.mark.slow
def test_a_content_change_replans_exactly_what_depends_on_it(toy_run):
    """The issue's reproduction as dry runs of the whole default DAG: a config change that rewrites a model's weights
    or the dataset at the same path plans the job that rewrites it and every job downstream of it, as forcing that
    job does (Snakemake's own closure of its dependents), and nothing else; run_info records the config, so it
    re-runs for any config change."""
    original = yaml.safe_load((toy_run / "config.yaml").read_text())
    assert dry_run_counts(toy_run) == {}
    forced_build = dry_run_counts(toy_run, "--forcerun", "results/models/toy_sd3_random")
    forced_prepare = dry_run_counts(toy_run, "--forcerun", "prepare_toy_world")
    try:
        changed = copy.deepcopy(original)
        changed["models"]["toy_sd3_random"]["build"]["seed"] = 1
        write_config(toy_run, changed)
        new_weights = dry_run_counts(toy_run)
        changed = copy.deepcopy(original)
        changed["toy_world"]["seed"] = 1
        write_config(toy_run, changed)
        new_data = dry_run_counts(toy_run)
    finally:
        write_config(toy_run, original)
    assert new_weights == forced_build | {"run_info": 1} == NEW_WEIGHTS_JOBS
    assert new_data == forced_prepare | {"run_info": 1} == NEW_DATA_JOBS
    assert dry_run_counts(toy_run) == {}


@pytest.mark.slow
def test_report_has_figure_table_and_captions(toy_run):
    snakemake(toy_run, "--report", "report.html", cores=None)  # the README's command, as written
    report = (toy_run / "report.html").read_text(errors="replace")
    assert "per_layer_toy_sd3_random_toy_objects_t8.png" in report
    assert "per_layer_toy_sd3_toy_objects_t8.csv" in report
    assert "toy_generations.png" in report
    assert "Segmentation quality of the image-to-text attention" in report
    assert "grounding check" in report


@pytest.mark.slow
def test_missing_label_file_fails_with_its_name(toy_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(toy_run, broken, ignore=shutil.ignore_patterns(".snakemake"))
    label = sorted((broken / "data/prepared/toy_world_objects/SegmentationClass").glob("toy_val_*.png"))[2]
    label.unlink()
    target = "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv"
    result = snakemake(broken, target, "--forcerun", "score_layers", check=False)
    assert result.returncode != 0
    log = (broken / "logs/score_layers/toy_sd3_toy_objects_t8.log").read_text()
    assert label.name in log


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("attention", {"colour": "red"}, r"unknown key\(s\) \['colour'\] in attention; allowed keys: \['background_name'"),
        ("attention", {"layers": [99]}, r"attention\.layers contains \[99\].*allowed 0\.\.11"),
        ("attention", {"timestep": 29}, r"attention\.timestep = 29 is out of range.*allowed 1\.\.28"),
        ("analyses", {"timestep_sweep": {"timesteps": [8, 40]}},
         r"analyses\.timestep_sweep\.timesteps contains \[40\].*allowed 1\.\.28"),
        ("toy_generations", {"device": "gpu"}, r"toy_generations\.device = 'gpu' is not a torch device"),
        ("verification", {"device": "gpu"}, r"verification\.device = 'gpu' is not a torch device"),
        ("attention", {"resize": "squash"}, r"allowed values: \['stretch', 'center_crop'\]"),
        ("run", {"models": ["sd4"]}, r"run\.models names 'sd4'.*defined models: \["),
        ("appendix", {"models": {"sd3": "sd4", "sd35": "toy_sd35_random", "flux": "toy_flux_random"}},
         r"appendix\.models\.sd3 names 'sd4', which is not defined"),
        ("models", {"toy_sd3_random": {"backbone": "sd3", "source": "elsewhere", "build": {"kind": "tiny-random"}}},
         r"models\.toy_sd3_random\.source = 'elsewhere'.*build_tiny_model"),
    ],
)
def test_bad_config_fails_at_dag_build_naming_the_key(tmp_path, section, values, expected):
    workdir = copy_workflow(tmp_path, **{section: values})
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert re.search(expected, result.stdout + result.stderr), result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_lint_is_clean(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def job_counts(dry_run_stdout: str) -> dict[str, int]:
    jobs = dry_run_stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", jobs, flags=re.MULTILINE)}


def test_paper_config_dry_run_lists_every_analysis_for_the_real_models(tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    plan_adapters(workdir)  # the + MAGNET rows' models apply trained adapters
    dry_run = snakemake(workdir, "-n", "--forceall", "--configfile", "config.yaml", "configs/paper.yaml")
    counts = job_counts(dry_run.stdout)
    # The README states the paper run's size as this dry run prints it.
    stated = re.search(r"prints \*\*(\d+) jobs in all\*\*", (REPO / "README.md").read_text())
    assert stated and int(stated.group(1)) == int(re.search(r"^total\s+(\d+)", dry_run.stdout, re.MULTILINE).group(1))
    # t = 8 for 3 models x 5 datasets, of which SD3 on VOC20 and on COCO-Object come from the two 28-step sweep
    # jobs of appendix Fig. 2 (one job per pair: VAE and text encoders once per image); 27 more scorings each.
    # Main Table 1's "+ MAGNET" rows: SD3 with each of the two adapters on its 5 sets.
    assert counts["extract_attention"] == 3 * 5 - 2 + 2 * 5
    assert counts["extract_attention_sweep"] == 2
    assert counts["score_layers"] == 3 * 5 + 2 * 27 + 2 * 5
    assert counts["timestep_sweep"] == 2
    # Unsupervised: main Table 2's models (SD3, SD3.5, and SD3 with each MAGNET adapter) on 6 sets.
    assert counts["extract_unsupervised_attention"] == 4 * 6
    assert counts["unsupervised_table"] == 12
    for rule in ("per_layer_table", "per_layer_figure", "normalisation_table"):
        assert counts[rule] == 15, rule
    for name in ("voc21", "coco_object", "pc59", "ade150", "coco_stuff27", "cityscapes"):
        assert counts[f"prepare_{name}"] == 1
    # MAGNET: the two official trainings of SD3-medium, on their prepared training sets.
    assert counts["magnet_train"] == 2
    assert counts["prepare_coco_stuff171_train"] == counts["prepare_sa1b_sa_000020"] == 1
    # The appendix's segmentation targets under their paper names, for the real models.
    assert counts["score_heads"] == 1  # Fig. 4: SD3 on VOC21
    assert counts["appendix_overlays"] == 6 and counts["appendix_per_layer"] == 3 and counts["main_table"] == 2
    for rule in ("fig02_timestep", "fig04_head_miou", "tab01_normalisation", "all_segmentation"):
        assert counts.get(rule, 0) <= 1, rule
    dry_run = snakemake(workdir, "-n", "all_segmentation", "--configfile", "config.yaml", "configs/paper.yaml")
    assert "sd3_medium/voc21/t8/per_head.csv" in dry_run.stdout
    # The sweep's t = 8 cache is the one the per-layer analyses of the swept pairs read (no second t = 8 job).
    assert "results/attention/sd3_medium/voc20/sweep/t8/manifest.json" in dry_run.stdout
    assert "results/attention/sd3_medium/voc20/t8/manifest.json" not in dry_run.stdout


def test_full_sweep_stays_available_as_an_option(tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    (workdir / "full.yaml").write_text("analyses: {timestep_sweep: {scope: all, record: attention_layers}}\n")
    dry_run = snakemake(workdir, "-n", "--forceall", "--configfile", "config.yaml", "configs/paper.yaml", "full.yaml")
    counts = job_counts(dry_run.stdout)
    # Every run model x dataset swept; the two MAGNET variants of the main tables keep their t = 8 caches.
    assert counts["extract_attention_sweep"] == 3 * 5 and counts["extract_attention"] == 2 * 5
    assert counts["score_layers"] == 3 * 5 * 28 + 2 * 5 and counts["timestep_sweep"] == 15


def test_a_code_change_reruns_the_stages_that_run_that_code_and_nothing_else(tmp_path):
    """The package's source is copied so that it can be edited; jobs import the copy (PYTHONPATH)."""
    (tmp_path / "run").mkdir()
    workdir = copy_workflow(tmp_path / "run", attention={"layers": [0, 1]})
    edit_config(workdir, "toy_world", n_val=2)
    src = tmp_path / "src"
    shutil.copytree(REPO / "src/seg4diff_repro", src / "seg4diff_repro", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(src)}
    target = "results/attention/toy_sd3/toy_objects/t8/manifest.json"
    log = workdir / "logs/extract_attention/toy_sd3_toy_objects_t8_1-of-1.log"  # the one shard's
    snakemake(workdir, target, env=env)
    assert "2 of 2 images to extract" in log.read_text()
    manifest = json.loads((workdir / target).read_text())
    assert manifest["provenance"]["code_fingerprint"] == manifest["inputs"]["code_fingerprint"]

    def plan() -> set[str]:
        result = snakemake(workdir, "-n", target, env=env)
        return set() if "Nothing to be done" in result.stdout + result.stderr else planned_jobs(result)

    assert plan() == set()
    table_code = src / "seg4diff_repro/tables/per_layer.py"
    table_code.write_text(table_code.read_text() + "\n# a change that no forward pass runs\n")
    assert plan() == set()
    snakemake(workdir, target, "--forcerun", "extract_attention_shard", env=env)  # same code: every image reused
    assert "0 of 2 images to extract" in log.read_text()

    recorder = src / "seg4diff_repro/attention/recorder.py"
    recorder.write_text(recorder.read_text() + "\n# a change to the code that computes the maps\n")
    assert plan() == {"extract_attention_shard", "extract_attention"}
    snakemake(workdir, target, env=env)
    assert "2 of 2 images to extract" in log.read_text()
    assert json.loads((workdir / target).read_text())["inputs"]["code_fingerprint"] != manifest["inputs"]["code_fingerprint"]


def test_committed_toy_outputs_cannot_stand_in_for_the_paper_runs(tmp_path):
    """The paper config writes under its own folders: with the toy world's outputs present (as in a fresh
    clone) its dry run schedules exactly the jobs it schedules without them, every output in paper/."""
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    for folder in ("figures", "paper_tables"):
        shutil.copytree(REPO / folder, workdir / folder)
    assert list((workdir / "figures/toy").glob("fig05_fidelity_sd3.*")), "the toy outputs are committed"
    paper = ("--configfile", "config.yaml", "configs/paper.yaml")
    with_toy = snakemake(workdir, "-n", "-p", *paper)
    for folder in ("figures", "paper_tables"):
        shutil.rmtree(workdir / folder)
    without_toy = snakemake(workdir, "-n", *paper)
    assert job_counts(with_toy.stdout) == job_counts(without_toy.stdout)
    outputs = set(re.findall(r"(?<![\w/.])(?:figures|paper_tables)/[\w./-]+", with_toy.stdout))
    assert "paper_tables/paper/fig05_fidelity_sd3.csv" in outputs and "figures/paper/fig02_timestep.png" in outputs
    assert not [path for path in outputs if path.split("/")[1] not in ("paper", "<namespace>")]


def test_report_opens_on_the_workflow_and_shows_each_table_with_its_provenance(tmp_path):
    """A small run (two val images, two layers), then its report: the landing page describes the workflow and
    its config, the table is a page carrying its settings-and-provenance line, and the run's commit is recorded."""
    from seg4diff_repro.provenance import git_state

    workdir = copy_workflow(tmp_path, attention={"layers": [0, 1]})
    edit_config(workdir, "toy_world", n_val=2)
    stem = "per_layer_toy_sd3_toy_objects_t8"
    targets = [f"results/report/toy/tables/{stem}.html", f"figures/toy/{stem}.png", "results/report/toy/run_info.html"]
    snakemake(workdir, *targets)
    snakemake(workdir, "--report", "report.html", *targets)
    report = (workdir / "report.html").read_text(errors="replace")
    assert "seg4diff-repro: the attention analyses of Seg4Diff" in report
    assert "toy_sd3, toy_sd3_random" in report  # run.models, rendered from the config
    for section in ("Per model and dataset", "Per-layer scores", "This run"):
        assert section in report, section

    markdown = (workdir / f"paper_tables/toy/{stem}.md").read_text()
    settings_line = next(line for line in markdown.splitlines() if line.startswith("model = toy_sd3"))
    page = (workdir / targets[0]).read_text()
    assert html.escape(settings_line) in page
    assert page.count("<tr>") == len(pd.read_csv(workdir / f"paper_tables/toy/{stem}.csv")) + 1
    run_page = (workdir / "results/report/toy/run_info.html").read_text()
    assert "toy_sd3_random" in run_page
    if git_state()["commit"] is not None:
        assert git_state()["commit"] in run_page
