"""Generation analyses (appendix Figs. 5, 7, 10, 18, 19): prompt lists, prompt truncation, config checks, and an
end-to-end Snakemake run of the generation targets on a scaled-down toy world, checked against stock pipelines."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from seg4diff_repro.config import ConfigError, apply_defaults, check_config, load_schema
from seg4diff_repro.generation.prompts import FIGURE_PROMPT_KEYS, figure_prompts, load_prompts
from seg4diff_repro.generation.sampling import PromptTruncationWarning, truncated_prompts
from test_workflow import REPO, TEST_SD3_LAYER, copy_workflow, generation_steps, snakemake, write_config

# The paper's own prompt lists, verbatim from its appendix (Fig. 1 and the figure captions).
APPENDIX = REPO / "tests/data/appendix_prompts.txt"
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
FIDELITY = ("fig05_fidelity_sd3", "fig07_fidelity_sd35", "fig10_fidelity_flux")
GRIDS = ("fig18_perturbation_grid", "fig19_guidance_grid")
TARGETS = [f"paper_tables/toy/{n}.{e}" for n in FIDELITY for e in ("csv", "md")] + [
    f"figures/toy/{n}.{e}" for n in (*FIDELITY, *GRIDS) for e in ("png", "pdf")
]


def squash(text: str) -> str:
    return " ".join(text.split())


# --- prompt lists -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def appendix_text() -> str:
    return squash(APPENDIX.read_text())


def test_drawbench_has_50_unique_prompts_verbatim_from_the_appendix(appendix_text):
    prompts = load_prompts()
    assert len(prompts) == len(set(prompts)) == 50 and all(prompts)
    for number, prompt in enumerate(prompts, start=1):
        assert f"{number}. {prompt}" in appendix_text, (number, prompt)
    assert prompts[0] == "A red colored car." and prompts[28] == "Rbefraigerator."
    assert prompts[49] == "New York Skyline with ’Google Research Pizza Cafe’ written with fireworks on the sky."
    assert load_prompts(limit=4) == prompts[:4]


def test_figure_prompts_are_the_captions_verbatim(appendix_text):
    assert set(json.loads((REPO / "src/seg4diff_repro/data/prompts/figure_prompts.json").read_text())) == set(
        FIGURE_PROMPT_KEYS
    )
    assert figure_prompts("fig17") == [""]
    assert figure_prompts("fig18")[1] == "A yellow colored giraffe"  # no full stop in the caption
    for key in FIGURE_PROMPT_KEYS:
        for prompt in figure_prompts(key):
            assert squash(prompt) in appendix_text, (key, prompt)
    assert [len(figure_prompts(k)) for k in ("fig18", "fig19", "fig20")] == [3, 3, 9]


def test_a_figure_run_draws_the_first_n_of_its_caption_prompts(tmp_path):
    from dataclasses import replace

    from seg4diff_repro.generation.runs import GenerationRun

    run = GenerationRun(model="m", backbone="sd3", source="m", run="none", seeds=[42], figure="fig20", n_prompts=3)
    assert run.prompts() == figure_prompts("fig20")[:3] and len(run.prompts()) == 3
    assert replace(run, n_prompts=None).prompts() == figure_prompts("fig20")  # null: all 9, the paper's
    # The rule passes analyses.generation.fig20_n_prompts to Fig. 20's runs only.
    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    # Layers every toy model has, so that the DAG builds whichever toy_sd3 is committed.
    config["analyses"]["generation"].update(fig20_n_prompts=2, grid_layers=[0], fidelity_layers={"sd3": [0], "sd35": [0], "flux": [0]})
    write_config(workdir, config)
    dry_run = snakemake(workdir, "-n", "results/generation/toy_sd3/fig20/none", "results/generation/toy_sd3/fig18/none")
    settings = {s["figure"]: s for s in (json.loads(m) for m in re.findall(r"--settings '(\{.*?\})'", dry_run.stdout))}
    assert settings["fig20"]["n_prompts"] == 2 and settings["fig18"]["n_prompts"] is None


def test_prompt_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["seg4diff_repro"]
    for name in ("drawbench50.txt", "figure_prompts.json"):
        assert any(fnmatch.fnmatch(f"data/prompts/{name}", pattern) for pattern in patterns), name


# --- prompt truncation ------------------------------------------------------------------------------


def test_sd3_prompt_over_77_clip_tokens_warns_with_its_token_count():
    from transformers import CLIPTokenizer

    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(REPO / "models/toy_sd3")
    prompts = load_prompts()
    tokenizer = CLIPTokenizer.from_pretrained(REPO / "models/toy_sd3/tokenizer")
    counts = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = truncated_prompts(pipe, prompts)
    messages = [str(w.message) for w in caught if issubclass(w.category, PromptTruncationWarning)]
    long = [(p, n) for p, n in zip(prompts, counts) if n > 77]
    assert long and len(messages) == len(found) == len(long)  # DrawBench #31 (misspelled words) is one
    for (prompt, count), message in zip(long, messages):
        assert repr(prompt) in message and f"{count} CLIP tokens" in message


def test_flux_prompt_over_the_t5_window_warns():
    from seg4diff_repro.models.tiny_flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline()
    long, short = "a red circle and " * 10 + "a blue square", "a red circle"
    t5_count = len(pipe.tokenizer_2(long)["input_ids"])
    with pytest.warns(PromptTruncationWarning, match=rf"{t5_count} T5 tokens, more than the 16-token window"):
        found = truncated_prompts(pipe, [long, short], max_sequence_length=16)
    assert [(f["prompt"], f["tokenizer"]) for f in found] == [(long, "T5")]


# --- config checks ----------------------------------------------------------------------------------


def toy_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_random_fidelity_weights_are_refused_for_a_real_model_at_dag_build():
    config = toy_config()
    check_config(copy.deepcopy(config), SCHEMA)  # the toy world: random weights allowed
    config["appendix"]["models"]["flux"] = "flux_dev"
    config["analyses"]["generation"]["fidelity_layers"]["flux"] = [0]
    with pytest.raises(ConfigError, match=r"appendix\.models\.flux = 'flux_dev' is neither.*weights: pretrained"):
        check_config(config, SCHEMA)
    config["analyses"]["generation"]["fidelity"]["weights"] = "pretrained"
    check_config(config, SCHEMA)


def test_flux_layers_beyond_the_double_stream_blocks_are_refused():
    config = toy_config()
    config["analyses"]["generation"]["fidelity_layers"]["flux"] = [1, 2]  # the tiny Flux has 2 double-stream blocks
    with pytest.raises(ConfigError, match=r"fidelity_layers\.flux contains \[2\].*double-stream"):
        check_config(config, SCHEMA)


def test_generation_defaults_are_the_paper_settings():
    config = toy_config()
    del config["analyses"]["generation"]
    generation = apply_defaults(config, load_schema(SCHEMA))["analyses"]["generation"]
    assert (generation["cfg"], generation["blur_sigma"], generation["blur_kernel"]) == (7.5, 9.0, 5)
    assert generation["fidelity"] == {"weights": "pretrained", "clip_arch": "ViT-B-32", "clip_pretrained": "openai",
                                      "dino_source": "facebook/dino-vits16", "seed": 0, "device": "cpu",
                                      "clip_revision": None, "dino_revision": None}  # config.yaml pins them
    assert generation["n_prompts"] is None
    assert generation["fidelity_layers"] == {"sd3": "all", "sd35": "all", "flux": "all"}


def test_unknown_grid_layer_fails_the_dag_build_naming_the_key(tmp_path):
    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["analyses"]["generation"]["grid_layers"] = [0, 12]  # toy_sd3 has layers 0..11
    write_config(workdir, config)
    result = snakemake(workdir, "-n", *TARGETS, check=False)
    assert result.returncode != 0
    assert "analyses.generation.grid_layers contains [12]" in result.stdout + result.stderr


# --- dry runs ---------------------------------------------------------------------------------------


def planned_outputs(dry_run) -> list[str]:
    """Outputs of the planned jobs: from the job details, or from a rule's message ("...; writes <output>; ...")."""
    details = re.findall(r"^\s+output: (.+)$", dry_run.stdout, flags=re.MULTILINE)
    messages = re.findall(r"^Job \d+: .*; writes (.+?); progress in ", dry_run.stdout, flags=re.MULTILINE)
    return details + [", ".join(message.split()) for message in messages]


def job_counts(dry_run) -> dict[str, int]:
    table = dry_run.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)}


def test_default_toy_dry_run_perturbs_the_configured_layers_and_only_flux_double_stream_blocks(tmp_path):
    dry_run = snakemake(copy_workflow(tmp_path), "-n", "all_generation")
    runs = [o for o in planned_outputs(dry_run) if o.startswith("results/generation/")]
    flux = sorted(o.rsplit("/", 1)[1] for o in runs if "/toy_flux_random/" in o)
    assert flux == ["none", "perturb_l0", "perturb_l1"]  # 2 double-stream blocks of 4
    # config.yaml's subsets of the 12-block toy model's layers: 4 perturbed for Fig. 5, 3 grid rows.
    assert sorted(o.rsplit("_l", 1)[1] for o in runs if "/toy_sd3/fidelity/perturb_l" in o) == ["0", "11", "5", "7"]
    assert sorted(o.rsplit("_l", 1)[1] for o in runs if "/toy_sd3/fig19/guidance_l" in o) == ["0", "11", "5"]
    assert set(TARGETS) <= {f for o in planned_outputs(dry_run) for f in o.split(", ")}


def test_paper_config_dry_run_lists_every_generation_job_for_the_real_models(tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", workdir / "configs")
    paper_targets = [target.replace("/toy/", "/paper/") for target in TARGETS]  # the paper config's namespace
    dry_run = snakemake(workdir, "-n", *paper_targets, "--configfile", "config.yaml", "configs/paper.yaml")
    counts = job_counts(dry_run)
    # SD3: 25 fidelity runs (unperturbed + 24 layers) + 25 Fig. 18 + 25 Fig. 19; SD3.5: 25; Flux: 1 + 19 double.
    assert counts["generate_run"] == 3 * 25 + 25 + 20
    assert counts["score_fidelity"] == counts["fidelity_figure"] == 3 and counts["generation_grid"] == 2
    outputs = planned_outputs(dry_run)
    assert "results/generation/flux_dev/fidelity/perturb_l18" in outputs
    assert "results/generation/flux_dev/fidelity/perturb_l19" not in outputs
    assert "results/generation/sd3_medium/fig19/guidance_l23" in outputs


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generation_run(toy_run) -> Path:
    """The generation targets of the shared toy run (tests/conftest.py): 2 prompts, 1 seed, one perturbed layer
    per fidelity figure."""
    assert all((toy_run / target).is_file() for target in TARGETS)
    return toy_run


@pytest.fixture
def one_thread():
    """One torch thread for the stock-pipeline calls: on a busy 2-core machine two threads run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_images(workdir: Path, model: str, prompt_set: str, run: str) -> tuple[dict, np.ndarray]:
    folder = workdir / "results/generation" / model / prompt_set / run
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, np.stack([np.asarray(Image.open(folder / e["file"])) for e in manifest["images"]])


@pytest.mark.slow
def test_unperturbed_sd3_run_equals_the_stock_pipeline_and_perturbed_runs_differ(generation_run, one_thread):
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    manifest, images = run_images(generation_run, "toy_sd3", "fidelity", "none")
    prompts = [e["prompt"] for e in manifest["images"]]
    assert prompts == load_prompts(limit=2) and [e["seed"] for e in manifest["images"]] == [3, 3]
    pipe = load_sd3_pipeline(generation_run / "models/toy_sd3")
    steps = generation_steps(generation_run)
    assert manifest["sampling"]["steps"] == steps
    stock = pipe(prompt=prompts, negative_prompt=[""] * 2, num_inference_steps=steps, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(3) for _ in prompts], max_sequence_length=77,
                 output_type="np").images
    np.testing.assert_allclose(images.astype(float), np.round(stock * 255), atol=1)
    _, perturbed = run_images(generation_run, "toy_sd3", "fidelity", f"perturb_l{TEST_SD3_LAYER}")
    assert np.abs(perturbed.astype(int) - images).max() > 8
    _, unguided = run_images(generation_run, "toy_sd3", "fig19", "none")
    _, guided = run_images(generation_run, "toy_sd3", "fig19", f"guidance_l{TEST_SD3_LAYER}")
    assert np.abs(guided.astype(int) - unguided).max() > 8


@pytest.mark.slow
def test_unperturbed_flux_run_equals_the_stock_flux_pipeline(generation_run, one_thread):
    from diffusers import FluxPipeline

    manifest, images = run_images(generation_run, "toy_flux_random", "fidelity", "none")
    assert manifest["height"] == manifest["width"] == 64
    pipe = FluxPipeline.from_pretrained(generation_run / "results/models/toy_flux_random")
    steps = generation_steps(generation_run)  # analyses.generation.steps, not the model's 50
    assert manifest["sampling"]["steps"] == steps
    stock = pipe(prompt=[e["prompt"] for e in manifest["images"]], height=64, width=64, num_inference_steps=steps,
                 guidance_scale=3.5, generator=[torch.Generator().manual_seed(3) for _ in range(2)],
                 max_sequence_length=77, output_type="np").images
    np.testing.assert_allclose(images.astype(float), np.round(stock * 255), atol=1)


@pytest.mark.slow
def test_fidelity_scores_are_one_exactly_where_the_image_is_unchanged(generation_run):
    scores = pd.read_csv(generation_run / "results/fidelity/fig05_fidelity_sd3.csv")
    assert sorted(scores["run"].unique()) == ["none", f"perturb_l{TEST_SD3_LAYER}"]
    for row in scores.itertuples():
        _, image = run_images(generation_run, "toy_sd3", "fidelity", row.run)
        _, reference = run_images(generation_run, "toy_sd3", "fidelity", "none")
        unchanged = np.array_equal(image[row.prompt_index], reference[row.prompt_index])
        # An image against itself: 1 within float32 rounding (2e-7); the perturbation at the grounding layer moves
        # the untrained scorers' cosines by 4e-6 or more.
        assert (row.clip_i > 1 - 1e-6) == unchanged and (row.dino > 1 - 1e-6) == unchanged
        assert -1 <= row.clip_t <= 1
    assert scores["clip_backbone"].str.contains("ViT-B-32").all()


@pytest.mark.slow
@pytest.mark.parametrize("name, model, stand_in, layer", [
    ("fig05_fidelity_sd3", "toy_sd3", "SD3-medium", TEST_SD3_LAYER),
    ("fig07_fidelity_sd35", "toy_sd35_random", "SD3.5-medium", 1),
    ("fig10_fidelity_flux", "toy_flux_random", "FLUX.1-dev", 1),
])
def test_fidelity_tables_and_figures_state_model_and_scale(generation_run, name, model, stand_in, layer):
    table = pd.read_csv(generation_run / f"paper_tables/toy/{name}.csv")
    scores = pd.read_csv(generation_run / f"results/fidelity/{name}.csv")
    assert table["run"].tolist() == ["none", f"perturb_l{layer}"] and (table["n_prompts"] == 2).all()
    perturbed = scores[scores["run"] == f"perturb_l{layer}"]
    assert table["clip_i_mean"].iloc[1] == pytest.approx(perturbed["clip_i"].mean(), abs=1e-4)
    assert table["dino_std"].iloc[1] == pytest.approx(perturbed["dino"].std(), abs=1e-4)
    markdown = (generation_run / f"paper_tables/toy/{name}.md").read_text()
    assert f"{model} standing in for {stand_in}" in markdown
    assert "2 prompts x 1 seed (3), 64x64 px" in markdown and "random weights" in markdown
    assert (generation_run / f"figures/toy/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (generation_run / f"figures/toy/{name}.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.slow
def test_grids_use_the_caption_prompts_and_one_seed(generation_run):
    for prompt_set, run in (("fig18", f"perturb_l{TEST_SD3_LAYER}"), ("fig19", f"guidance_l{TEST_SD3_LAYER}")):
        manifest, images = run_images(generation_run, "toy_sd3", prompt_set, run)
        assert [e["prompt"] for e in manifest["images"]] == figure_prompts(prompt_set)
        assert {e["seed"] for e in manifest["images"]} == {0} and images.shape == (3, 64, 64, 3)
    for name in GRIDS:
        png = Image.open(generation_run / f"figures/toy/{name}.png")
        assert png.size[0] > 300 and png.size[1] > 3 * 150  # three prompt rows of labelled tiles
        assert (generation_run / f"figures/toy/{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert (generation_run / f"logs/generate_run/toy_sd3_fig19_guidance_l{TEST_SD3_LAYER}.log").is_file()


@pytest.mark.slow
def test_report_has_the_generation_figures_and_captions(generation_run):
    snakemake(generation_run, "--report", "report.html", *TARGETS)  # the default target would ask for `all`
    report = (generation_run / "report.html").read_text(errors="replace")
    for name in (*FIDELITY, *GRIDS):
        assert f"{name}.png" in report, name
    assert "Image fidelity under single-layer I2T attention perturbation" in report
    assert "with s = 3.0 (the paper does not" in report
