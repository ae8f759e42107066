"""CPU smoke test of the toy-model training: both phases learn, the folder is float16, small and loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import CLIPTokenizer
from safetensors import safe_open
from safetensors.torch import load_file

from seg4diff_repro.datasets import generate_toy_shapes
from seg4diff_repro.models.tiny import TinySD3Config, build_tiny_sd3_pipeline
from seg4diff_repro.models.train_toy import (
    MAX_FOLDER_BYTES,
    TOY_TRAINED_CONFIG,
    _lr_factor,
    alignment_loss,
    class_name_prompt,
    class_token_positions,
    clip_prompt_embeds,
    tokenize_prompts,
    train_toy_model,
)

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("toy_train")
    generate_toy_shapes(tmp / "data", n_train=4, n_val=0, seed=0)
    record = train_toy_model(
        tmp / "data",
        tmp / "model",
        vae_steps=24,
        transformer_steps=24,
        batch_size=2,
        lr=1e-3,
        seed=0,
        device="cpu",
        log_every=8,
    )
    return tmp / "model", record


def test_both_phases_reduce_their_loss(trained) -> None:
    _, record = trained
    losses = record["final_losses"]
    print({k: round(v, 4) for k, v in losses.items() if v is not None})
    assert losses["vae_fixed_batch_mse_after"] < 0.6 * losses["vae_fixed_batch_mse_before"]
    assert losses["transformer_fixed_batch_after_raw"] < 0.9 * losses["transformer_fixed_batch_before"]
    assert losses["transformer_fixed_batch_after_ema"] < losses["transformer_fixed_batch_before"]
    assert losses["vae_train_last"] < losses["vae_train_first"]
    assert record["steps"] == {"vae": 24, "transformer": 24}


def test_folder_is_float16_small_and_recorded(trained) -> None:
    folder, record = trained
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"toy model folder: {size / 1e6:.2f} MB")
    assert size <= MAX_FOLDER_BYTES
    assert record["folder_mb"] == round(size / 1e6, 2)
    for name in COMPONENTS:
        (weights,) = (folder / name).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
        assert dtypes == {"F16"}, (name, dtypes)
    info = json.loads((folder / "seg4diff_model.json").read_text())
    assert info["kind"] == "toy-trained" and info["seed"] == 0
    assert {"steps", "batch", "lr", "final_losses", "wall_time_s", "device_name", "versions"} <= info.keys()
    assert set(info["versions"]) == {"torch", "diffusers", "transformers"}
    assert not list(folder.parent.glob(".model.*"))  # no temp folders left behind


def test_loads_with_stock_pipeline_and_pooled_path_is_absent(trained) -> None:
    folder, record = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(
        folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    assert all(getattr(pipe, name).dtype == torch.float32 for name in COMPONENTS)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["recipe"]["vae_latent_scaling_factor"])
    assert pipe.vae.config.shift_factor == pytest.approx(record["recipe"]["vae_latent_shift_factor"])
    assert all(p.abs().max() == 0 for p in pipe.transformer.time_text_embed.text_embedder.parameters())
    # The pooled text vector has no effect on the prediction: text enters only through joint attention.
    torch.manual_seed(0)
    latents, context = torch.randn(2, 16, 32, 32), torch.randn(2, 154, 64)
    outputs = [
        pipe.transformer(
            hidden_states=latents,
            timestep=torch.tensor([500.0, 300.0]),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        for pooled in (torch.zeros(2, 64), torch.randn(2, 64) * 10)
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_only_the_used_word_embeddings_are_trained(trained) -> None:
    folder, _ = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    control = build_tiny_sd3_pipeline(TOY_TRAINED_CONFIG, seed=0)
    captions = json.loads((folder.parent / "data" / "captions.json").read_text()).values()
    prompts = [*captions, *(class_name_prompt(c) for c in captions), ""]
    for name, ids in zip(("text_encoder", "text_encoder_2"), tokenize_prompts(pipe, prompts)):
        encoder, reference = getattr(pipe, name), getattr(control, name)
        assert encoder.config.num_hidden_layers == 1
        trained_sd, control_sd = encoder.state_dict(), reference.state_dict()
        changed = {k for k in control_sd if not torch.equal(trained_sd[k].float(), control_sd[k].half().float())}
        assert changed == {
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
        }, (name, changed)
        rows = (trained_sd["text_model.embeddings.token_embedding.weight"].float()
                != control_sd["text_model.embeddings.token_embedding.weight"].half().float()).any(dim=1)
        assert set(torch.nonzero(rows).ravel().tolist()) <= set(ids.unique().tolist())


def test_clip_prompt_embeds_matches_the_pipeline() -> None:
    pipe = build_tiny_sd3_pipeline(seed=3)
    prompts = ["a red circle and a blue square", "circle square", ""]
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=77,
    )
    with torch.no_grad():
        embeds, pooled = clip_prompt_embeds(pipe, *tokenize_prompts(pipe, prompts))
    assert embeds.shape == (3, 154, 64)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_frozen_text_encoders_option(tmp_path: Path) -> None:
    generate_toy_shapes(tmp_path / "data", n_train=2, n_val=0, seed=1)
    record = train_toy_model(
        tmp_path / "data", tmp_path / "model", vae_steps=0, transformer_steps=2, batch_size=2, device="cpu",
        train_text_encoders=False,
    )
    assert record["steps"] == {"vae": 0, "transformer": 2}
    assert record["recipe"]["text_encoders"].startswith("frozen")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "model", text_encoder_3=None, tokenizer_3=None)
    control = build_tiny_sd3_pipeline(TOY_TRAINED_CONFIG, seed=0)
    for name in ("text_encoder", "text_encoder_2"):
        for key, value in getattr(control, name).state_dict().items():
            assert torch.equal(getattr(pipe, name).state_dict()[key].float(), value.half().float()), (name, key)


def test_class_name_prompt() -> None:
    assert class_name_prompt("a blue square, a red circle and a yellow star") == "circle square star"
    assert class_name_prompt("a green triangle") == "triangle"
    assert class_name_prompt("a photo of a dog") == "a photo of a dog"


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="caption_dropout"):
        train_toy_model(tmp_path, tmp_path / "m", caption_dropout=0.8, names_prob=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        train_toy_model(tmp_path, tmp_path / "m", batch_size=0)


def test_replaces_a_model_folder_whose_index_snakemake_deleted(tmp_path: Path) -> None:
    """Snakemake deletes the rule's output (model_index.json) before a rerun; the rest of the folder is ours."""
    generate_toy_shapes(tmp_path / "data", n_train=2, n_val=0, seed=2)
    out = tmp_path / "model"
    (out / "transformer").mkdir(parents=True)
    (out / "seg4diff_model.json").write_text('{"kind": "toy-trained"}')
    record = train_toy_model(tmp_path / "data", out, vae_steps=0, transformer_steps=0, batch_size=2)
    assert record["steps"] == {"vae": 0, "transformer": 0}
    assert (out / "model_index.json").is_file()


def test_refuses_an_unrelated_folder_before_training(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        train_toy_model(tmp_path / "no-dataset-needed", out)
    assert (out / "keep.txt").read_text() == "mine"


def test_init_from_continues_the_earlier_model_and_keeps_its_record(trained, tmp_path: Path) -> None:
    """With lr = 0 and no VAE steps, continuing changes no weight: the start is the earlier folder, not a new random
    initialisation (which the same seed would give); and the earlier record is kept."""
    folder, record = trained
    generate_toy_shapes(tmp_path / "data", n_train=4, n_val=0, seed=0)
    continued = train_toy_model(
        tmp_path / "data", tmp_path / "continued", vae_steps=0, transformer_steps=2, batch_size=2, lr=0.0,
        seed=0, device="cpu", init_from=folder,
    )
    assert continued["init_from"] == {"folder": str(folder), "record": json.loads((folder / "seg4diff_model.json").read_text())}
    assert continued["init_from"]["record"]["steps"] == record["steps"]
    for component in COMPONENTS:
        before, after = (load_file(next((root / component).glob("*.safetensors"))) for root in (folder, tmp_path / "continued"))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), component


def test_init_from_refuses_other_sizes(trained, tmp_path: Path) -> None:
    folder, _ = trained
    generate_toy_shapes(tmp_path / "data", n_train=2, n_val=0, seed=0)
    with pytest.raises(ValueError, match="other sizes than asked for"):
        train_toy_model(tmp_path / "data", tmp_path / "m", vae_steps=0, transformer_steps=1, batch_size=2,
                        device="cpu", init_from=folder, config=TinySD3Config(num_layers=2))


def test_class_token_positions_finds_each_class_word(trained) -> None:
    folder, _ = trained
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    names = ["background", "circle", "star", "grass", "ring"]
    positions = class_token_positions(
        tokenizer, ["a striped red circle and a blue star on grass", "background circle", ""], names)
    # token 0 is the start token: "a"=1 "striped"=2 "red"=3 "circle"=4 "and"=5 "a"=6 "blue"=7 "star"=8 "on"=9 "grass"=10
    assert positions.tolist() == [[-1, 4, 8, 10, -1], [1, 2, -1, -1, -1], [-1] * 5]
    with pytest.raises(ValueError, match="one token each"):
        class_token_positions(tokenizer, ["a cat"], ["traffic light"])


def test_alignment_loss_matches_a_float64_recomputation() -> None:
    """Per cell: the head-mean scores over the prompt's class tokens, cross-entropy against the labelled class's token;
    cells of an unnamed class and ignore cells are skipped."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 9, generator=generator) * 3
    positions = torch.tensor([[1, 3, -1, 5], [-1, 2, 4, -1]])
    labels = torch.tensor([[0, 1, 2, 3, 255, 1], [1, 2, 0, 3, 2, 255]], dtype=torch.uint8)
    terms = []
    for b in range(2):
        candidates = [p for p in positions[b].tolist() if p >= 0]
        for n in range(6):
            label = int(labels[b, n])
            if label >= 4 or positions[b, label] < 0:
                continue
            scores = logits[b, :, n].double().mean(0)
            terms.append(torch.logsumexp(scores[candidates], 0) - scores[int(positions[b, label])])
    expected = torch.stack(terms).mean()
    assert len(terms) == 7
    assert torch.allclose(alignment_loss(logits, positions, labels).double(), expected, atol=1e-5)
    assert alignment_loss(logits, positions, torch.full_like(labels, 255)).item() == 0.0


def test_alignment_training_lowers_its_loss_and_is_recorded(tmp_path: Path) -> None:
    generate_toy_shapes(tmp_path / "data", n_train=4, n_val=0, seed=0)
    with pytest.raises(ValueError, match="align_layer must be a joint layer"):
        train_toy_model(tmp_path / "data", tmp_path / "m", align_layer=TOY_TRAINED_CONFIG.num_layers)
    record = train_toy_model(
        tmp_path / "data", tmp_path / "aligned", vae_steps=0, transformer_steps=30, batch_size=4, lr=3e-3, seed=0,
        device="cpu", log_every=10, names_prob=0.5, align_layer=1, align_weight=1.0,
    )
    losses = record["final_losses"]
    assert record["recipe"]["alignment"]["layer"] == 1 and record["recipe"]["alignment"]["weight"] == 1.0
    assert losses["alignment_fixed_batch_after_raw"] < losses["alignment_fixed_batch_before"]


def test_learning_rate_decays_with_the_time_budget_when_it_ends_first() -> None:
    # Steps alone: halfway through the decay the factor is 0.55; the end of the budget takes it to the floor.
    assert _lr_factor(0, 1000, 100) == pytest.approx(0.01)
    assert _lr_factor(550, 1000, 100) == pytest.approx(0.55)
    assert _lr_factor(550, 1000, 100, time_fraction=1.0) == pytest.approx(0.1)
    # A time share behind the steps changes nothing; one ahead of them sets the decay.
    assert _lr_factor(550, 1000, 100, time_fraction=0.2) == pytest.approx(0.55)
    assert _lr_factor(200, 40000, 100, time_fraction=0.5) == pytest.approx(0.55)
