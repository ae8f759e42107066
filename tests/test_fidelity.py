"""CLIP-I / CLIP-T / DINO fidelity scores against direct open_clip and transformers computations, offline.

The backbones are tiny local stand-ins (a registered open_clip config saved as a checkpoint file, a
``save_pretrained`` ViT folder), loaded through the same code path as the hub weights.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from seg4diff_repro.cli import main
from seg4diff_repro.generation.fidelity import (
    FidelityScorer,
    FidelitySettings,
    RandomWeightsRefused,
)

TINY_CLIP = "seg4diff-test-tiny-clip"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny open_clip architecture with a checkpoint file, and a tiny DINO-style ViT folder."""
    root = tmp_path_factory.mktemp("backbones")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (root / "configs").mkdir()
    (root / "configs" / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(1)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    checkpoint = root / "tiny_clip.pt"
    torch.save(clip.state_dict(), checkpoint)
    dino = root / "dino"
    torch.manual_seed(2)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=32), add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(dino)
    return checkpoint, dino


@pytest.fixture(scope="module")
def scorer(backbones):
    checkpoint, dino = backbones
    settings = FidelitySettings(clip_arch=TINY_CLIP, clip_pretrained=str(checkpoint), dino_source=str(dino),
                                batch_size=2)
    return FidelityScorer(settings, model="sd3_medium")  # pretrained (local) weights: no toy flag needed


def images(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def test_clip_path_equals_direct_open_clip(backbones, scorer):
    checkpoint, _ = backbones
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(checkpoint))
    model.eval()
    ims, prompts = images(), ["a red circle", "a blue square", "two green stars"]
    with torch.no_grad():
        direct_images = unit(model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in ims])))
        direct_text = unit(model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts)))
    torch.testing.assert_close(scorer.clip_image_embeddings(ims), direct_images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.clip_text_embeddings(prompts), direct_text, rtol=1e-5, atol=1e-5)
    scores = scorer.score(ims, ims[::-1], prompts)
    np.testing.assert_allclose([s["clip_t"] for s in scores], (direct_images * direct_text).sum(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose([s["clip_i"] for s in scores],
                               (direct_images * direct_images.flip(0)).sum(-1).numpy(), atol=1e-5)
    assert "tiny_clip.pt" in scorer.backbones["clip_backbone"]


def test_dino_path_equals_direct_transformers(backbones, scorer):
    _, folder = backbones
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    processor = ViTImageProcessor.from_pretrained(folder)
    ims = images()
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(im) for im in ims], return_tensors="pt")["pixel_values"]
        direct = unit(model(pixel_values=pixels).last_hidden_state[:, 0])
    torch.testing.assert_close(scorer.dino_embeddings(ims), direct, rtol=1e-4, atol=1e-4)
    scores = scorer.score(ims, ims[::-1], ["x"] * 3)
    np.testing.assert_allclose([s["dino"] for s in scores], (direct * direct.flip(0)).sum(-1).numpy(), atol=1e-4)
    assert scorer.backbones["dino_backbone"] == str(folder)


def test_an_image_against_itself_scores_one_and_others_less(scorer):
    ims = images(seed=3)
    same = scorer.score(ims, ims, ["a cat"] * 3)
    for row in same:
        assert row["clip_i"] == pytest.approx(1, abs=1e-5) and row["dino"] == pytest.approx(1, abs=1e-5)
    different = scorer.score(ims, images(seed=4), ["a cat"] * 3)
    assert all(row["clip_i"] < 1 - 1e-4 and row["dino"] < 1 - 1e-4 for row in different)


def test_random_weights_are_refused_for_a_real_model():
    with pytest.raises(RandomWeightsRefused, match=r"models\.sd3_medium\.toy.*weights: pretrained"):
        FidelityScorer(FidelitySettings(weights="random"), toy_model=False, model="sd3_medium")


def test_cli_refuses_random_weights_without_the_toy_flag(tmp_path):
    with pytest.raises(RandomWeightsRefused, match="toy models only"):
        main(["score-fidelity", "--runs", str(tmp_path), "--reference", str(tmp_path), "--model", "flux_dev",
              "--settings", json.dumps({"weights": "random"}), "--out", str(tmp_path / "scores.csv")])
    assert not (tmp_path / "scores.csv").exists()


def test_random_weights_build_the_configured_architectures_repeatably(backbones):
    _, dino = backbones
    settings = FidelitySettings(weights="random", clip_arch=TINY_CLIP, clip_pretrained="unused", dino_source=str(dino))
    first, second = (FidelityScorer(settings, toy_model=True) for _ in range(2))
    reseeded = FidelityScorer(FidelitySettings(**{**settings.__dict__, "seed": 5}), toy_model=True)
    ims = images(n=2)
    assert torch.equal(first.clip_image_embeddings(ims), second.clip_image_embeddings(ims))
    assert torch.equal(first.dino_embeddings(ims), second.dino_embeddings(ims))
    assert not torch.allclose(first.clip_image_embeddings(ims), reseeded.clip_image_embeddings(ims))
    assert first.dino.config.hidden_size == 32  # the local folder's architecture, not its weights
    assert first.backbones["fidelity_weights"] == "random"


def test_random_default_dino_has_the_size_of_vit_s16():
    settings = FidelitySettings(weights="random", clip_arch=TINY_CLIP)  # dino_source: facebook/dino-vits16
    scorer = FidelityScorer(settings, toy_model=True)
    # ViT-S/16 (DINO): about 21.7 M parameters without the pooler; 197 tokens (CLS + 14x14 patches) at 224 px.
    assert 21.5e6 < sum(p.numel() for p in scorer.dino.parameters()) < 21.9e6
    pixels = scorer.dino_processor(images=[Image.fromarray(images(n=1)[0])], return_tensors="pt")["pixel_values"]
    assert scorer.dino(pixel_values=pixels).last_hidden_state.shape == (1, 197, 384)


def test_unknown_clip_weights_name_the_tags():
    with pytest.raises(FileNotFoundError, match="openai"):
        FidelityScorer(FidelitySettings(clip_pretrained="no-such-tag"))


def test_scores_record_the_generating_model_and_the_backbones_by_fingerprint(backbones, scorer, tmp_path):
    """Each score row names what made it: the generating model as its run's manifest recorded it, and the CLIP
    and DINO weights by content (here local files: the checkpoint's sha256, the DINO folder's fingerprint)."""
    import hashlib

    from seg4diff_repro.generation.fidelity import score_run
    from seg4diff_repro.generation.runs import GenerationRun, run_generation
    from seg4diff_repro.models.common import model_fingerprint
    from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

    checkpoint, dino = backbones
    model = write_tiny_sd3_pipeline(tmp_path / "model", seed=5)
    run_generation(GenerationRun(model="tiny", backbone="sd3", source=str(model), run="none", seeds=[0],
                                 n_prompts=2, steps=2), tmp_path / "run")
    rows = score_run(tmp_path / "run", tmp_path / "run", scorer)
    assert len(rows) == 2
    assert set(rows["model_fingerprint"]) == {model_fingerprint(model)}
    assert set(rows["model_source"]) == {str(model)} and rows["model_revision"].isna().all()
    assert set(rows["clip_fingerprint"]) == {"sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert set(rows["dino_fingerprint"]) == {model_fingerprint(dino)}
