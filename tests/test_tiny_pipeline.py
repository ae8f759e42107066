"""The tiny SD3 pipeline must load and run through the stock diffusers path used for the real SD3 checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from seg4diff_repro.models import TinySD3Config, build_tiny_sd3_pipeline, write_tiny_sd3_pipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
PROMPTS = ["a red circle", "diningtable", "A sign that says 'Hello World'!", ""]


def _load(folder: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


def _same_weights(a: StableDiffusion3Pipeline, b: StableDiffusion3Pipeline) -> dict[str, bool]:
    result = {}
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        result[name] = all(torch.equal(sa[k], sb[k]) for k in sa)
    return result


@pytest.fixture(scope="module")
def built() -> StableDiffusion3Pipeline:
    return build_tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(folder: Path) -> StableDiffusion3Pipeline:
    return _load(folder)


def test_folder_layout(folder: Path) -> None:
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # no temp siblings left behind
    for name in COMPONENTS:
        weights = list((folder / name).glob("*.safetensors"))
        assert len(weights) == 1, name
        assert not list((folder / name).glob("*.bin")), name
    info = json.loads((folder / "seg4diff_model.json").read_text())
    assert info == {"kind": "tiny-random", "seed": 0, "config": json.loads(json.dumps(asdict(TinySD3Config())))}
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}  # readable like any file the user writes, not mkstemp's 0600
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]


def test_weights_roundtrip_through_save_and_load(built, loaded) -> None:
    assert _same_weights(built, loaded) == dict.fromkeys(COMPONENTS, True)
    for name in COMPONENTS:
        module = getattr(loaded, name)
        assert module.dtype == torch.float32 and not module.training, name


def test_same_seed_same_weights_other_seed_different(built, tmp_path: Path) -> None:
    same = build_tiny_sd3_pipeline(seed=0, tokenizer_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    assert _same_weights(built, same) == dict.fromkeys(COMPONENTS, True)
    assert _same_weights(built, build_tiny_sd3_pipeline(seed=1)) == dict.fromkeys(COMPONENTS, False)


def test_stock_pipeline_runs_end_to_end(loaded) -> None:
    out = loaded(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_image_tokens_and_latent_normalisation(loaded) -> None:
    assert loaded.vae_scale_factor == 2 and loaded.default_sample_size == 32
    latents = torch.zeros(1, 16, 32, 32)
    tokens = loaded.transformer.pos_embed(latents)
    assert tokens.shape == (1, 256, 128)
    assert loaded.vae.config.shift_factor == 0.0609 and loaded.vae.config.scaling_factor == 1.5305
    assert loaded.scheduler.config.shift == 3.0 and loaded.scheduler.config.num_train_timesteps == 1000


def test_encode_prompt_without_t5(loaded) -> None:
    embeds, _, pooled, _ = loaded.encode_prompt(
        "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    assert embeds.shape == (1, 154, 64)
    assert pooled.shape == (1, 64)
    assert torch.all(embeds[:, 77:] == 0)  # T5 absent: stock diffusers fills its rows with zeros
    assert embeds[:, :77].abs().sum() > 0
    # diffusers' default max_sequence_length=256 would give 77 + 256 text tokens instead.
    default_embeds = loaded.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False)[0]
    assert default_embeds.shape == (1, 77 + 256, 64)


def test_tokenizers_roundtrip(built, loaded) -> None:
    for name in ("tokenizer", "tokenizer_2"):
        original, reloaded = getattr(built, name), getattr(loaded, name)
        kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert reloaded(PROMPTS, **kwargs).input_ids == original(PROMPTS, **kwargs).input_ids, name
        assert (reloaded.pad_token_id, reloaded.model_max_length) == (original.pad_token_id, 77), name
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer_2.pad_token_id) == (49407, 0)


def test_rewrite_replaces_previous_model(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    write_tiny_sd3_pipeline(target, seed=0)
    write_tiny_sd3_pipeline(target, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert json.loads((target / "seg4diff_model.json").read_text())["seed"] == 1
    assert _same_weights(_load(target), build_tiny_sd3_pipeline(seed=1)) == dict.fromkeys(COMPONENTS, True)


def test_refuses_to_replace_unrelated_folder(tmp_path: Path) -> None:
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes"):
        write_tiny_sd3_pipeline(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert (target / "keep.txt").read_text() == "mine"


def test_inconsistent_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="caption_projection_dim=64"):
        TinySD3Config(caption_projection_dim=64)
    with pytest.raises(ValueError, match="joint_attention_dim=128"):
        TinySD3Config(joint_attention_dim=128)
