"""MAGNET on the generation side (issue 15): appendix Fig. 20 (the baseline and the two MAGNET models' generations,
one seed per column) and main Table 3 (CLIPScore), on the toy world with adapters made as the MAGNET contract says.

References: the stock `StableDiffusion3Pipeline` (Fig. 20's baseline row), torchmetrics' `CLIPScore` on the same
weights (the CLIPScore numbers), hand-computed means (Table 3)."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from seg4diff_repro.config import ConfigError, check_config
from seg4diff_repro.generation.prompts import figure_prompts
from magnet_adapters import make_toy_adapter
from test_workflow import REPO, copy_workflow, generation_steps, snakemake

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
TOY_MODEL = REPO / "models/toy_sd3"
TOY_RUNS = {"toy_sd3_magnet_coco": ("toy_sd3_coco", "coco"), "toy_sd3_magnet_sa1b": ("toy_sd3_sa1b", "sa1b")}
PAPER_RUNS = ("sd3_medium_coco", "sd3_medium_sa1b")
FIG20 = "fig20_magnet_generations"
TABLE3 = "main_table3_clipscore"


# --- CLIPScore against torchmetrics ----------------------------------------------------------------


class _Unpacked(torch.nn.Module):
    """The CLIPModel as torchmetrics 1.9 expects it: transformers 5 returns a model output from get_*_features
    (the projection in its pooler_output), torchmetrics a tensor. Only unpacks; computes nothing."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values):
        return self.clip.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.clip.get_text_features(input_ids, attention_mask).pooler_output


@pytest.fixture(scope="module")
def small_clip():
    """A small random CLIP (ViT-L/14's layout, fewer and narrower layers) with the offline CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from seg4diff_repro.generation.clipscore import CLIP_VIT_L14_CONFIG, offline_clip_processor

    small = copy.deepcopy(CLIP_VIT_L14_CONFIG)
    small["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    small["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    torch.manual_seed(1)
    return CLIPModel(CLIPConfig(**small)).eval(), offline_clip_processor()


def test_clipscore_equals_torchmetrics_on_the_same_weights(small_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    from seg4diff_repro.generation.clipscore import ClipScorer, ClipScoreSettings

    clip, processor = small_clip
    scorer = ClipScorer(ClipScoreSettings(weights="random", batch_size=2), toy_model=True, clip=clip,
                        processor=processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    long = " ".join(figure_prompts("fig20")[6:8])  # 74 + 57 tokens: past CLIP's 77 positions
    prompts = ["a red circle", "a blue square and a yellow star", long]
    assert scorer.cut_prompts(prompts) == [prompts[2]]
    cosines = scorer.cosines(images, prompts)
    ours = scorer.scores(images, prompts)
    np.testing.assert_array_equal(ours, 100 * np.maximum(cosines, 0))  # the clamp is per image
    for image, prompt, cosine in zip(images, prompts, cosines):
        metric = CLIPScore(model_name_or_path=lambda: (_Unpacked(clip), processor))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns that it cuts the long prompt
            metric.update(torch.from_numpy(image).permute(2, 0, 1), prompt)
        # One pair: torchmetrics' max(mean, 0) is the pair's own 100 · max(cos, 0).
        assert float(metric.compute()) == pytest.approx(100 * max(cosine, 0), abs=1e-4)
        assert float(metric.score) == pytest.approx(100 * cosine, abs=1e-4)  # its unclamped sum, for the sign too


def test_clipscore_random_weights_are_refused_for_a_real_model():
    from seg4diff_repro.generation.clipscore import ClipScorer, ClipScoreSettings

    with pytest.raises(ValueError, match="toy models only.*'sd3_medium'.*weights: pretrained"):
        ClipScorer(ClipScoreSettings(weights="random"), toy_model=False, model="sd3_medium")


# --- Table 3 against hand-computed means -----------------------------------------------------------


def test_table3_means_per_set_and_over_sets_beside_the_paper():
    from seg4diff_repro.tables.clipscore import PAPER_TABLE3, clipscore_table

    roles = {"sd3": "base", "sd3_magnet_coco": "coco", "sd3_magnet_sa1b": "sa1b"}
    rows = []
    values = {"base": [20.0, 22.0, 30.0, 34.0], "coco": [21.0, 25.0, 31.0, 31.0], "sa1b": [10.0, 12.0, 40.0, 50.0]}
    for model, scores in values.items():
        for i, score in enumerate(scores):
            rows.append({"model": model, "prompt_set": "pickapic" if i < 2 else "coco", "prompt_index": i % 2,
                         "clipscore": score, "model_fingerprint": f"fp-{model}"})
    table = clipscore_table(pd.DataFrame(rows), roles).set_index("role")
    assert list(table.index) == ["sd3", "sd3_magnet_sa1b", "sd3_magnet_coco"]  # the paper's row order
    assert table.loc["sd3", "pickapic"] == 21.0 and table.loc["sd3", "coco"] == 32.0
    assert table.loc["sd3", "mean"] == pytest.approx((21.0 + 32.0) / 2)
    assert table.loc["sd3_magnet_sa1b", "coco"] == 45.0 and table.loc["sd3_magnet_sa1b", "pickapic_images"] == 2
    assert table.loc["sd3_magnet_coco", "coco_paper"] == 26.2319
    assert table.loc["sd3_magnet_coco", "coco_diff"] == pytest.approx(31.0 - 26.2319)
    assert "sa1b" not in table  # a set nobody scored is no column
    paper = PAPER_TABLE3["sd3"]
    assert paper["mean"] == pytest.approx(np.mean([paper["pickapic"], paper["coco"], paper["sa1b"]]), abs=1e-4)
    with pytest.raises(ValueError, match="no CLIPScore rows of sa1b .*sd3_magnet_sa1b"):
        clipscore_table(pd.DataFrame(rows).query("model != 'sa1b'"), roles)


# --- config ----------------------------------------------------------------------------------------


def toy_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def merged_paper_config() -> dict:
    """config.yaml updated by configs/paper.yaml as Snakemake merges config files (nested mappings merge)."""
    def update(base: dict, new: dict) -> dict:
        for key, value in new.items():
            base[key] = update(base.get(key, {}), value) if isinstance(value, dict) and isinstance(
                base.get(key), dict) else value
        return base

    return update(toy_config(), yaml.safe_load((REPO / "configs/paper.yaml").read_text()))


def test_magnet_config_checks_name_the_key():
    check_config(toy_config(), SCHEMA)
    paper = merged_paper_config()
    check_config(paper, SCHEMA)  # the paper's sets replace the toy captions by files
    assert paper["analyses"]["generation"]["clipscore"]["prompt_sets"]["coco"]["prompts"] is None
    one_role = toy_config()
    del one_role["appendix"]["models"]["sd3_magnet_sa1b"]
    with pytest.raises(ConfigError, match="sd3_magnet_coco is set but appendix.models.sd3_magnet_sa1b is not"):
        check_config(one_role, SCHEMA)
    both = toy_config()
    both["analyses"]["generation"]["clipscore"]["prompt_sets"]["coco"]["prompts_file"] = "prompts.txt"
    with pytest.raises(ConfigError, match=r"prompt_sets\.coco: give exactly one of `prompts`"):
        check_config(both, SCHEMA)
    real = merged_paper_config()
    real["analyses"]["generation"]["clipscore"]["weights"] = "random"
    with pytest.raises(ConfigError, match="clipscore.weights = 'random' is allowed for toy.*appendix.models.sd3 "):
        check_config(real, SCHEMA)


# --- dry runs --------------------------------------------------------------------------------------


def test_dry_runs_build_fig20_and_table3_with_the_adapters_as_inputs(tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    toy = snakemake(workdir, "-n", "all_generation")
    assert f"figures/toy/{FIG20}.png" in toy.stdout and f"paper_tables/toy/{TABLE3}.md" in toy.stdout
    assert "magnet_train" in toy.stdout  # the configured runs train the adapters the variants apply
    for model in ("toy_sd3", *TOY_RUNS):
        for prompt_set in ("fig20", "clipscore_pickapic", "clipscore_coco", "clipscore_sa1b"):
            assert f"results/generation/{model}/{prompt_set}/none" in toy.stdout, (model, prompt_set)
    paper_targets = [f"figures/paper/{FIG20}.png", f"paper_tables/paper/{TABLE3}.md"]
    paper = snakemake(workdir, "-n", *paper_targets, "--configfile", "config.yaml", "configs/paper.yaml")
    assert "generate_run" in paper.stdout and "score_clipscore" in paper.stdout
    for model in ("sd3_medium", "sd3_medium_magnet_coco", "sd3_medium_magnet_sa1b"):
        assert f"results/generation/{model}/fig20/none" in paper.stdout
        assert f"results/generation/{model}/clipscore_pickapic/none" in paper.stdout
    # The run settings the rules pass: seed 42 in every Fig. 20 run, the adapter folder for the MAGNET models.
    details = snakemake(workdir, "-n", "-p", f"figures/paper/{FIG20}.png", "--configfile", "config.yaml",
                        "configs/paper.yaml").stdout
    settings = [json.loads(line.split("--settings ")[1].split("' --device")[0].strip("'"))
                for line in details.splitlines() if "generate-run --settings" in line]
    assert len(settings) == 3 and {tuple(s["seeds"]) for s in settings} == {(42,)}
    assert {(s["cfg"], s["steps"]) for s in settings} == {(7.5, 28)}
    assert sorted(s.get("lora") or "" for s in settings) == [
        "", "results/magnet/sd3_medium_coco/adapter", "results/magnet/sd3_medium_sa1b/adapter"]


# --- end to end on the toy world -------------------------------------------------------------------


@pytest.fixture(scope="module")
def magnet_run(toy_run) -> Path:
    """Fig. 20 and Table 3 as the default toy run builds them, from the adapters its magnet_train jobs trained."""
    return toy_run


def run_images(workdir: Path, model: str, prompt_set: str) -> tuple[dict, np.ndarray]:
    folder = workdir / "results/generation" / model / prompt_set / "none"
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, np.stack([np.asarray(Image.open(folder / e["file"])) for e in manifest["images"]])


@pytest.mark.slow
def test_fig20_columns_share_prompt_and_seed_and_the_baseline_row_is_the_stock_pipeline(magnet_run):
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    manifest, baseline = run_images(magnet_run, "toy_sd3", "fig20")
    n_prompts = yaml.safe_load((magnet_run / "config.yaml").read_text())["analyses"]["generation"]["fig20_n_prompts"]
    prompts = figure_prompts("fig20")[:n_prompts]  # the toy config's first 3 of the caption's 9
    assert len(prompts) == 3
    assert [(e["prompt"], e["seed"]) for e in manifest["images"]] == [(p, 42) for p in prompts]
    pipe = load_sd3_pipeline(magnet_run / "models/toy_sd3")  # StableDiffusion3Pipeline.from_pretrained, no T5
    steps = generation_steps(magnet_run)
    stock = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=steps, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(42) for _ in prompts], max_sequence_length=77,
                 output_type="np").images
    np.testing.assert_allclose(baseline.astype(float), np.round(stock * 255), atol=1)
    for model, (run, _) in TOY_RUNS.items():
        trained_manifest, trained = run_images(magnet_run, model, "fig20")
        assert [(e["prompt"], e["seed"]) for e in trained_manifest["images"]] == [(p, 42) for p in prompts]
        assert trained_manifest["adapter"]["run"] == run
        assert trained_manifest["model_fingerprint"].startswith(manifest["model_fingerprint"] + "+lora:sha256:")
        assert np.abs(trained.astype(int) - baseline).max() > 0  # the trained LoRA changes the images
    png = Image.open(magnet_run / f"figures/toy/{FIG20}.png")
    record = json.loads(png.text["seg4diff model"])
    assert record["sampling"] == {"cfg": 7.5, "steps": steps, "seeds": [42] * 3}
    assert [row["label"] for row in record["rows"]] == ["Baseline", "MAGNET (COCO)", "MAGNET (SA-1B)"]
    assert png.size[0] > 3 * 100 and png.size[1] > 3 * 100  # 3 columns, 3 rows of tiles


@pytest.mark.slow
def test_table3_is_the_mean_of_the_per_image_scores_with_its_backbone_recorded(magnet_run):
    scores = pd.read_csv(magnet_run / "results/clipscore/main_table3.csv")
    table = pd.read_csv(magnet_run / f"paper_tables/toy/{TABLE3}.csv").set_index("model")
    assert len(scores) == 3 * 3 * 1  # 3 models x 3 sets x 1 prompt (the toy config's n_prompts) x 1 seed
    for (model, prompt_set), group in scores.groupby(["model", "prompt_set"]):
        assert table.loc[model, prompt_set] == pytest.approx(group["clipscore"].mean(), abs=1e-4)
    np.testing.assert_allclose(scores["clipscore"], 100 * np.maximum(scores["cosine"], 0))
    assert scores["clip_backbone"].str.contains("openai/clip-vit-large-patch14, random weights").all()
    markdown = (magnet_run / f"paper_tables/toy/{TABLE3}.md").read_text()
    assert "100 · max(cos, 0) per image" in markdown and "random weights" in markdown
    assert "| Baseline" in markdown and "27.0252" in markdown  # the paper's number beside ours


@pytest.mark.slow
def test_a_zero_lora_leaves_the_images_and_a_trained_one_changes_them(tmp_path):
    """apply_lora in the generation loader: B = 0 gives the base model's images, random B other images."""
    from dataclasses import replace

    from seg4diff_repro.generation.runs import GenerationRun, run_generation

    base = GenerationRun(model="toy_sd3", backbone="sd3", source=str(TOY_MODEL), run="none", seeds=[42], steps=4,
                         prompts_list=["a red circle", "a blue square"])
    folders = {"zero": make_toy_adapter(tmp_path / "zero", run="zero", seed=1, scale=0.0),
               "trained": make_toy_adapter(tmp_path / "trained", run="trained", seed=1, scale=0.5)}
    images = {}
    for name, lora in (("base", None), *((name, str(folder)) for name, folder in folders.items())):
        manifest = run_generation(replace(base, lora=lora), tmp_path / f"run_{name}")
        images[name] = np.stack([np.asarray(Image.open(tmp_path / f"run_{name}" / e["file"]))
                                 for e in manifest["images"]])
    np.testing.assert_array_equal(images["zero"], images["base"])
    assert np.abs(images["trained"].astype(int) - images["base"]).max() > 8
