"""Pins that mean something: hub models and fidelity backbones load the configured commit, a branch name is
refused, and the real models run in the official code's dtype."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from seg4diff_repro.config import ConfigError, apply_defaults, check_config, load_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
COMMIT = r"^[0-9a-f]{40}$"


def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_every_hub_model_and_pretrained_backbone_is_pinned_to_a_commit():
    config = apply_defaults(default_config(), load_schema(SCHEMA))
    hub_models = {name: model for name, model in config["models"].items() if "/" in model["source"]
                  and not (REPO / model["source"]).exists() and "build" not in model}
    assert set(hub_models) == {"sd3_medium", "sd35_medium", "flux_dev"}
    for name, model in hub_models.items():
        assert model["revision"] is not None and len(model["revision"]) == 40, name
        int(model["revision"], 16)
    fidelity = config["analyses"]["generation"]["fidelity"]
    for key in ("clip_revision", "dino_revision"):
        assert fidelity[key] is not None and len(fidelity[key]) == 40, key
        int(fidelity[key], 16)


def test_the_real_models_run_in_the_official_codes_dtype():
    """docs/method.md#models: the official code loads SD3, SD3.5 and FLUX.1-dev in fp16 (Flux: "always fp16 (not bf16)")."""
    models = default_config()["models"]
    assert {name: models[name]["dtype"] for name in ("sd3_medium", "sd35_medium", "flux_dev")} == {
        "sd3_medium": "float16", "sd35_medium": "float16", "flux_dev": "float16"}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["models"]["sd3_medium"].update(revision="main"),
         r"models\.sd3_medium\.revision = 'main' is not allowed; expected .*commit \(40 hex digits\)"),
        (lambda c: c["models"]["toy_sd3"].update(revision="0" * 40),
         r"models\.toy_sd3\.revision = '0{40}' is set, but models\.toy_sd3\.source = 'models/toy_sd3' is a local folder"),
        (lambda c: c["analyses"]["generation"]["fidelity"].update(dino_revision="v1.0"),
         r"analyses\.generation\.fidelity\.dino_revision = 'v1\.0' is not allowed"),
    ],
)
def test_a_revision_that_is_not_a_pin_fails_naming_the_key(edit, expected):
    config = copy.deepcopy(default_config())
    edit(config)
    with pytest.raises(ConfigError, match=expected):
        check_config(config, SCHEMA)


def test_a_hub_model_and_dino_load_the_pinned_commit_from_the_hub_cache(tmp_path):
    """A hub cache with two commits of the same repositories (different weights), offline: the revision picks
    the commit, the fingerprint names it, and a commit that is not there fails with the model's name."""
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import torch
        from transformers import ViTConfig, ViTImageProcessor, ViTModel
        from seg4diff_repro.generation.fidelity import FidelityScorer, FidelitySettings
        from seg4diff_repro.models.common import ModelLoadError, model_fingerprint
        from seg4diff_repro.models.sd3 import load_sd3_pipeline
        from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

        cache, first, second = Path(sys.argv[1]), "a" * 40, "b" * 40
        repo = cache / "models--someone--tiny-sd3" / "snapshots"
        dino = cache / "models--someone--tiny-dino" / "snapshots"
        for seed, commit in enumerate((first, second)):
            write_tiny_sd3_pipeline(repo / commit, seed=seed)
            torch.manual_seed(seed)
            config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=16)
            ViTModel(config, add_pooling_layer=False).save_pretrained(dino / commit)
            ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino / commit)

        def first_weight(pipe):
            return pipe.transformer.transformer_blocks[0].attn.to_q.weight

        loaded = load_sd3_pipeline("someone/tiny-sd3", torch.float32, revision=first)
        expected = load_sd3_pipeline(repo / first, torch.float32)
        other = load_sd3_pipeline(repo / second, torch.float32)
        result = {
            "same_as_pinned": bool(torch.equal(first_weight(loaded), first_weight(expected))),
            "differs_from_other": not torch.equal(first_weight(loaded), first_weight(other)),
            "fingerprint": model_fingerprint("someone/tiny-sd3", first),
        }
        try:
            load_sd3_pipeline("someone/tiny-sd3", torch.float32, revision="c" * 40)
        except ModelLoadError as error:
            result["missing_commit"] = str(error)
        scorer = FidelityScorer.__new__(FidelityScorer)
        scorer.settings = FidelitySettings(dino_source="someone/tiny-dino", dino_revision=second)
        scorer.device = torch.device("cpu")
        scorer._load_dino()
        pinned = ViTModel.from_pretrained(dino / second, add_pooling_layer=False)
        result["dino_same_as_pinned"] = all(torch.equal(a, b) for a, b in zip(scorer.dino.state_dict().values(),
                                                                                pinned.state_dict().values()))
        result["dino_name"] = scorer.dino_name
        # dino_revision null: the commit the cache's main points at is loaded, and recorded.
        (cache / "models--someone--tiny-dino" / "refs").mkdir()
        (cache / "models--someone--tiny-dino" / "refs" / "main").write_text(second)
        newest = FidelityScorer.__new__(FidelityScorer)
        newest.settings = FidelitySettings(dino_source="someone/tiny-dino", dino_revision=None)
        newest.device = torch.device("cpu")
        newest._load_dino()
        result["newest_is_main"] = all(torch.equal(a, b) for a, b in zip(newest.dino.state_dict().values(),
                                                                          pinned.state_dict().values()))
        result["newest_fingerprint"] = newest.dino_fingerprint
        result["newest_name"] = newest.dino_name
        print(json.dumps(result))
        """
    )
    cache = tmp_path / "hub"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same_as_pinned"] and result["differs_from_other"]
    assert result["fingerprint"] == "hub:someone/tiny-sd3@" + "a" * 40
    assert "someone/tiny-sd3" in result["missing_commit"] and "offline" in result["missing_commit"]
    assert result["dino_same_as_pinned"]
    assert result["dino_name"] == "someone/tiny-dino@" + "b" * 40
    assert result["newest_is_main"]
    assert result["newest_fingerprint"] == "hub:someone/tiny-dino@" + "b" * 40
    assert result["newest_name"] == "someone/tiny-dino@" + "b" * 40


def test_clip_downloads_the_pinned_commit_of_its_tag_and_keeps_the_tags_preprocessing(monkeypatch):
    """open_clip fetches a tag's weights from the newest commit; with clip_revision the scorer fetches that
    commit's file itself and builds the model from it with the tag's QuickGELU and preprocessing."""
    open_clip = pytest.importorskip("open_clip")
    from seg4diff_repro.generation.fidelity import FidelityScorer, FidelitySettings

    calls = {}

    def download(repo, filename=None, revision=None, cache_dir=None):
        calls["download"] = (repo, filename, revision)
        return "/pinned/open_clip_model.safetensors"

    class Stop(Exception):
        pass

    def create(arch, **kwargs):
        calls["create"] = (arch, kwargs)
        raise Stop

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", download)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    scorer = FidelityScorer.__new__(FidelityScorer)
    scorer.settings = FidelitySettings(clip_revision="d" * 40)
    with pytest.raises(Stop):
        scorer._load_clip()
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert calls["download"] == ("timm/vit_base_patch32_clip_224.openai", None, "d" * 40)
    arch, kwargs = calls["create"]
    assert arch == "ViT-B-32" and kwargs["pretrained"] == "/pinned/open_clip_model.safetensors"
    assert kwargs["force_quick_gelu"] is True
    assert kwargs["image_mean"] == tag["mean"] and kwargs["image_std"] == tag["std"]


@pytest.mark.parametrize("revision", [None, "d" * 40])
def test_clip_records_the_commit_its_weights_came_from_pinned_or_not(monkeypatch, tmp_path, revision):
    """With clip_revision null the scorer still fetches the tag's file itself (the newest commit), so the
    commit of the file's snapshot folder, the one actually loaded, names the weights."""
    open_clip = pytest.importorskip("open_clip")
    import torch

    from seg4diff_repro.generation.fidelity import FidelityScorer, FidelitySettings

    resolved = revision or "e" * 40
    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / resolved
    calls = {}

    def download(repo, filename=None, revision=None, cache_dir=None):
        calls["revision"] = revision
        return str(snapshot / "open_clip_model.safetensors")

    def create(arch, **kwargs):
        return torch.nn.Linear(1, 1), None, None

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", download)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    scorer = FidelityScorer.__new__(FidelityScorer)
    scorer.settings = FidelitySettings(clip_revision=revision)
    scorer.device = torch.device("cpu")
    scorer._load_clip()
    assert calls["revision"] == revision
    assert scorer.clip_fingerprint == "hub:timm/vit_base_patch32_clip_224.openai@" + resolved
    assert scorer.clip_name.endswith("at timm/vit_base_patch32_clip_224.openai@" + resolved)
