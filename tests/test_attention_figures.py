"""Attention figures from generation: PCA vs float64 numpy, token labels, tables, and the Snakemake targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import CLIPTokenizer

from seg4diff_repro.attention.during_generation import find_token, prompt_mask, token_labels
from seg4diff_repro.cli import main
from seg4diff_repro.figures.pca import pca_projections, pca_rgb
from seg4diff_repro.generation.prompts import figure_prompts
from seg4diff_repro.tables.value_norms import peak_layers, value_norm_heads_table
from test_workflow import copy_workflow, planned_jobs, run_config, snakemake, toy_layers

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "toy_sd3" / "tokenizer"


def attention_figure_targets(namespace: str) -> list[str]:
    """The attention figures and their tables, under a config's output namespace (toy, paper, ...)."""
    return [
        *(f"paper_tables/{namespace}/{stem}.{ext}" for stem in (
            "fig15_value_norms_heads_sd3", "fig06_value_norms_sd35", "fig09_value_norms_flux") for ext in ("csv", "md")),
        *(f"figures/{namespace}/{stem}.{ext}" for stem in (
            "fig15_value_norms_heads_sd3", "fig06_value_norms_sd35", "fig09_value_norms_flux", "fig16_pca_qkv_sd3",
            "fig03_i2t_t2i_sd3", "fig12_token_maps_sd3", "fig13_head_maps_sd3", "fig14_head_maps_sd3",
            "fig17_null_token_maps_sd3") for ext in ("png", "pdf")),
    ]


TARGETS = attention_figure_targets("toy")


def correlated_features(seed: int = 0, n: int = 256, dim: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 5, generator=generator) * torch.tensor([5.0, 3.0, 2.0, 0.5, 0.1])
    return (latent @ torch.randn(5, dim, generator=generator) + 0.05 * torch.randn(n, dim, generator=generator)).float()


def test_pca_matches_float64_numpy_svd():
    features = correlated_features()
    x = features.double().numpy()
    x = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:3] * np.sign(vt[np.arange(3), np.abs(vt[:3]).argmax(axis=1)])[:, None]
    expected = x @ components.T
    ours = pca_projections(features).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert ours.var(axis=0)[0] > ours.var(axis=0)[1] > ours.var(axis=0)[2]
    # Scores on different components are uncorrelated.
    correlation = np.corrcoef(ours.T)
    np.testing.assert_allclose(correlation, np.eye(3), atol=1e-8)

    rgb = pca_rgb(features, (16, 16))
    assert rgb.shape == (16, 16, 3)
    scaled = (expected - expected.min(axis=0)) / (expected.max(axis=0) - expected.min(axis=0))
    np.testing.assert_allclose(rgb.reshape(-1, 3), scaled, atol=1e-12)
    assert np.allclose(rgb.reshape(-1, 3).min(axis=0), 0) and np.allclose(rgb.reshape(-1, 3).max(axis=0), 1)


def test_pca_rgb_ignores_a_constant_offset_but_not_the_token_order():
    features = correlated_features(1)
    rgb = pca_rgb(features, (16, 16))
    np.testing.assert_allclose(pca_rgb(features + 7.0, (16, 16)), rgb, atol=1e-6)
    assert not np.allclose(pca_rgb(features.flip(0), (16, 16)), rgb, atol=1e-3)
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(features, (8, 8))


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def test_token_labels_are_decoded_bpe_pieces(tokenizer):
    prompt = figure_prompts("fig12")[2]
    labels = token_labels(tokenizer, prompt)
    real = labels[: labels.index("<eos>") + 1]
    # As the paper's Fig. 12 labels them.
    assert real == ["<sos>", "a", "small", "vessel", "pro", "pelled", "on", "water", "by", "o", "ars", ",", "sails",
                    ",", "or", "an", "engine", ".", "<eos>"]
    assert len(labels) == 77 and set(labels[len(real):]) == {"<pad>"}
    assert find_token(labels, "vessel") == 3
    assert find_token(labels, "propelled") == 4  # a split word: its first piece
    with pytest.raises(ValueError, match="not a token"):
        find_token(labels, "bicycle")


def test_empty_prompt_is_sos_eos_and_75_pads(tokenizer):
    assert token_labels(tokenizer, "") == ["<sos>", "<eos>"] + ["<pad>"] * 75
    mask = prompt_mask(tokenizer, "")
    assert mask.shape == (1, 77) and mask[0, :2].all() and not mask[0, 2:].any()
    labels = token_labels(tokenizer, figure_prompts("fig03")[1])
    assert [labels[find_token(labels, word)] for word in ("panda", "latte")] == ["panda", "latte"]


def synthetic_per_head() -> pd.DataFrame:
    rows = []
    for k, sigma in ((28, 1.0), (8, 0.515)):
        for layer in range(3):
            for head in range(2):
                # Layer 1 has the largest text norms, head 1 of layer 2 the largest image norm.
                rows.append({"timestep_k": k, "sigma": sigma, "layer": layer, "head": head,
                             "image": 1.0 + (layer == 2) * head * 3, "text": 2.0 + (layer == 1) * 5 + head,
                             "prompt": 3.0 + layer})
    return pd.DataFrame(rows)


def test_value_norm_tables():
    table = value_norm_heads_table(synthetic_per_head())
    assert len(table) == 2 * 3 * 3
    assert list(table.columns) == ["timestep_k", "sigma", "tokens", "layer", "head_0", "head_1", "max_head"]
    assert table["timestep_k"].iloc[0] == 28 and table["tokens"].iloc[0] == "image"
    image_layer2 = table[(table["tokens"] == "image") & (table["layer"] == 2)]
    assert image_layer2["max_head"].tolist() == [1, 1] and image_layer2["head_1"].tolist() == [4.0, 4.0]
    assert peak_layers(synthetic_per_head()) == "t = 28: image 2, text 1, prompt 2; t = 8: image 2, text 1, prompt 2"


def test_value_norm_layers_figure_is_deterministic(tmp_path):
    per_layer = synthetic_per_head().groupby(["timestep_k", "sigma", "layer"])[["image", "text", "prompt"]].mean()
    per_layer = per_layer.reset_index().assign(
        block=lambda frame: np.where(frame["layer"] < 2, "double", "single"), n_prompts=4, model="toy_flux_random",
        scale="toy scale", num_steps=50, cfg="n/a", seed=0, step_convention="official", model_fingerprint="sha256:ab",
        step_index=lambda frame: 50 - frame["timestep_k"],
    )
    per_layer.to_csv(tmp_path / "per_layer.csv", index=False)
    outputs = []
    for run in ("a", "b"):
        files = {ext: tmp_path / f"{run}.{ext}" for ext in ("csv", "md", "png", "pdf")}
        main(["value-norm-layers-figure", "--per-layer", str(tmp_path / "per_layer.csv"), "--role", "flux",
              "--figure-number", "9", *(arg for ext, path in files.items()
                                         for arg in (f"--{'markdown' if ext == 'md' else ext}", str(path)))])
        outputs.append({ext: path.read_bytes() for ext, path in files.items()})
    assert outputs[0] == outputs[1]
    markdown = outputs[0]["md"].decode()
    assert "toy_flux_random standing in for FLUX.1-dev" in markdown and "layers 12 and 17" in markdown
    assert "Peak layers here: t = 28: image 2, text 1, prompt 2" in markdown
    assert "model_fingerprint = sha256:ab" in markdown  # the model the value-norms job loaded
    # Which step "t = 28" is on Flux's 50-step schedule, and under which convention, is stated.
    assert "step_convention = official" in markdown and "t = 28 is index 22, not the first step" in markdown


@pytest.mark.parametrize("command", [["pca-qkv-figure"], ["token-maps-figure", "--figure", "fig17"]])
def test_pca_and_token_map_figures_record_the_fingerprint_of_the_model_they_loaded(command, tmp_path):
    """These jobs load the model themselves: the PNG and the PDF keep its source, revision and content fingerprint
    in their metadata, the same record as the value-norm CSVs."""
    import json
    import re

    from PIL import Image

    from seg4diff_repro.models.common import model_fingerprint
    from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

    model = write_tiny_sd3_pipeline(tmp_path / "model", seed=4)
    settings = {"model": "tiny", "role": "sd3", "backbone": "sd3", "source": str(model), "revision": None,
                "dtype": "float32", "options": {}, "num_steps": 4, "analysis_layer": 1, "toy": True}
    png, pdf = tmp_path / "figure.png", tmp_path / "figure.pdf"
    main([*command, "--model-settings", json.dumps(settings), "--timestep", "2", "--png", str(png), "--pdf", str(pdf)])
    expected = {"model_source": str(model), "model_revision": None, "model_fingerprint": model_fingerprint(model)}
    assert json.loads(Image.open(png).text["seg4diff model"]) == expected
    # The PDF's Info dictionary: /Subject (a literal string, with \\, \( and \) escaped).
    subject = re.search(rb"/Subject \(((?:[^\\()]|\\.)*)\)", pdf.read_bytes()).group(1)
    assert json.loads(re.sub(rb"\\(.)", rb"\1", subject)) == expected


def test_paper_config_plans_the_attention_figure_jobs(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "configs").mkdir()
    (workdir / "configs" / "paper.yaml").write_text((REPO / "configs" / "paper.yaml").read_text())
    dry = snakemake(workdir, "-n", "-p", "--configfile", "config.yaml", "configs/paper.yaml", "--",
                    *attention_figure_targets("paper"))
    jobs = planned_jobs(dry)
    assert {"value_norms", "value_norm_heads_figure", "value_norm_layers_figure", "pca_qkv_figure",
            "token_maps_figure"} <= jobs
    assert "build_tiny_model" not in jobs  # the real models come from the hub
    for model in ("sd3_medium", "sd35_medium", "flux_dev"):
        assert f"results/value_norms/{model}/per_head.csv" in dry.stdout
    assert "--layers '[7, 8, 9, 10]'" in dry.stdout and '"analysis_layer": 9' in dry.stdout


@pytest.mark.slow
def test_toy_world_builds_every_attention_figure(toy_run):
    workdir = toy_run  # the whole default DAG (tests/conftest.py)
    magic = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".csv": b"timestep_k,", ".md": b"# Appendix Fig."}
    for target in TARGETS:
        assert (workdir / target).read_bytes().startswith(magic[Path(target).suffix]), target
    heads = pd.read_csv(workdir / "paper_tables/toy/fig15_value_norms_heads_sd3.csv")
    # toy_sd3: 12 layers x 4 heads, 3 token groups, t = 28 and t = 8.
    assert len(heads) == 2 * 3 * len(toy_layers()) and [f"head_{h}" for h in range(4)] == [c for c in heads if c.startswith("head_")]
    layers = pd.read_csv(workdir / "paper_tables/toy/fig09_value_norms_flux.csv")
    assert layers["block"].tolist()[:4] == ["double", "double", "single", "single"]
    assert sorted(layers["timestep_k"].unique()) == [8, 28]
    # "prompt" excludes the padding: it differs from "text" (all 77 positions).
    assert not np.allclose(layers["prompt"], layers["text"])
    markdown = (workdir / "paper_tables/toy/fig06_value_norms_sd35.md").read_text()
    assert "toy_sd35_random standing in for SD3.5-medium (toy scale" in markdown
    assert f"the first {run_config(workdir)['analyses']['attention_figures']['n_prompts']} DrawBench prompts" in markdown
    for stem in ("token_maps_figure/fig17_null_token_maps_sd3", "value_norms/toy_sd3"):
        assert (workdir / "logs" / f"{stem}.log").exists()
