"""MAGNET's training loop on the committed toy model: resume after a kill, what trains, the schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_repro.magnet.lora import lora_state_dict
from seg4diff_repro.magnet.train import MagnetRecipe, MagnetTrainer, batch_indices, learning_rate_factor
from seg4diff_repro.models.sd3 import SD3Adapter
from seg4diff_repro.datasets.toy_shapes import generate_toy_shapes

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = REPO / "models" / "toy_sd3"


@dataclass
class Example:
    image: torch.Tensor
    prompt: str
    masks: torch.Tensor
    class_names: list[str] | None


class ToyShapesMasks:
    """toy-shapes train images as COCO-protocol examples: a mask and a prompt word per class present."""

    def __init__(self, root: Path, protocol: str = "coco"):
        self.root, self.protocol = root, protocol
        self.ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
        self.names = __import__("json").loads((root / "classes.json").read_text())["names"]

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, index: int, generator: torch.Generator) -> Example:
        name = self.ids[index]
        image = np.asarray(Image.open(self.root / f"JPEGImages/{name}.jpg").convert("RGB"))
        label = torch.from_numpy(np.asarray(Image.open(self.root / f"SegmentationClass/{name}.png")).copy())
        if torch.rand((), generator=generator) < 0.5:  # a draw from the generator, as the augmentations make
            image, label = image[:, ::-1], label.flip(-1)
        present = [c for c in label.unique().tolist() if 0 < c < 255]
        names = [self.names[c] for c in present]
        return Example(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255, " ".join(names),
                       torch.stack([(label == c).float() for c in present]),
                       names if self.protocol == "coco" else None)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_shapes")
    generate_toy_shapes(root, n_train=16, n_val=2, image_size=64, seed=0)
    return root


def fresh_adapter() -> SD3Adapter:
    return SD3Adapter.from_pretrained(TOY_MODEL)


def recipe(**changes) -> MagnetRecipe:
    settings = dict(protocol="coco", layer=0, iterations=4, batch_size=2, warmup_iterations=2, checkpoint_every=2,
                    lr_lora=1e-3, lr_head=1e-3, clip_grad_norm=1.0, seed=3)
    return MagnetRecipe(**{**settings, **changes})


class Killed(Exception):
    pass


@pytest.mark.parametrize("protocol", ["coco", "sa1b"])
def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(tmp_path, toy_root, protocol):
    settings = recipe(protocol=protocol, conv_head=protocol == "coco")
    uninterrupted = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root, protocol), tmp_path / "a")
    uninterrupted.train()

    def kill_at_three(record: dict) -> None:
        if record["iteration"] == 3:
            raise Killed

    killed = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root, protocol), tmp_path / "b")
    with pytest.raises(Killed):
        killed.train(on_step=kill_at_three)
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir()) == ["iter_000002.pt"]
    resumed = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root, protocol), tmp_path / "b")
    chosen = resumed.train()

    assert chosen["iteration"] == 4 and resumed.iteration == 4
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in uninterrupted.history]
    expected, got = lora_state_dict(uninterrupted.transformer), lora_state_dict(resumed.transformer)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    if settings.conv_head:
        for name, tensor in uninterrupted.head.state_dict().items():
            assert torch.equal(tensor, resumed.head.state_dict()[name]), name
    # The run changed the weights: the comparison above could have failed.
    assert any(tensor.abs().sum() > 0 for name, tensor in got.items() if "lora_B" in name)


def test_only_the_image_stream_lora_and_the_head_train(tmp_path, toy_root):
    base = {name: p.detach().clone() for name, p in fresh_adapter().transformer.named_parameters()}
    trainer = MagnetTrainer(fresh_adapter(), recipe(iterations=2), ToyShapesMasks(toy_root), tmp_path)
    head_before = {name: t.clone() for name, t in trainer.head.state_dict().items()}
    trainer.train()
    trained = dict(trainer.transformer.named_parameters())
    lora = [name for name in trained if "lora_" in name]
    assert lora and all(".attn.to_" in name for name in lora)
    assert not any("add_" in name or "attn2" in name for name in lora)
    n_blocks = len(trainer.transformer.transformer_blocks)
    assert len(lora) == n_blocks * 4 * 2  # q, k, v, out of every block; A and B each
    for name, parameter in trained.items():
        if "lora_" in name:
            continue
        stock = name.replace(".base_layer", "")
        assert torch.equal(parameter, base[stock]), f"{name} changed"
    assert all(trained[name].abs().sum() > 0 for name in lora if "lora_B" in name)
    assert any(not torch.equal(t, head_before[name]) for name, t in trainer.head.state_dict().items())


def test_learning_rate_is_detectron2_warmup_cosine():
    official = MagnetRecipe(protocol="coco", iterations=3000, warmup_iterations=500, warmup_factor=0.01)
    assert learning_rate_factor(0, official) == pytest.approx(0.01)
    alpha = 250 / 500
    assert learning_rate_factor(250, official) == pytest.approx(
        (0.01 * (1 - alpha) + alpha) * 0.5 * (1 + math.cos(math.pi * 250 / 3000)))
    assert learning_rate_factor(1000, official) == pytest.approx(0.75)  # 0.5·(1 + cos(π/3))
    assert learning_rate_factor(3000, official) == pytest.approx(0.0, abs=1e-12)


def test_optimiser_runs_lora_and_head_at_their_own_rates(tmp_path, toy_root):
    settings = recipe(iterations=10, warmup_iterations=4, lr_lora=1e-5, lr_head=1e-4)
    trainer = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root), tmp_path)
    record = trainer.step()
    assert record["lr_lora"] == pytest.approx(1e-5 * 0.01)
    trainer.step()
    lora_rate, head_rate = (group["lr"] for group in trainer.optimizer.param_groups)
    assert lora_rate == pytest.approx(1e-5 * learning_rate_factor(2, settings))
    assert head_rate == pytest.approx(1e-4 * learning_rate_factor(2, settings))
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-4)


def test_noising_draws_logit_normal_indices_of_the_shifted_1000_step_schedule(tmp_path, toy_root):
    trainer = MagnetTrainer(fresh_adapter(), recipe(), ToyShapesMasks(toy_root), tmp_path)
    latents = torch.randn(64, 4, 2, 2, dtype=torch.float64).float()
    trainer.iteration = 7
    noisy, timesteps, noise = trainer._noised(latents, micro_step=0)
    generator = torch.Generator().manual_seed((3 * 1_000_003 + 7) * 10_007 + 0)
    z = torch.randn(64, generator=generator).double()
    for i in range(64):
        u = 1 / (1 + math.exp(-0.5 * float(z[i])))
        index = min(int(1000 * u), 999)
        s = (1000 - index) / 1000  # the unshifted descending schedule 1, 0.999, ..., 0.001
        sigma = 3 * s / (1 + 2 * s)  # shift 3
        assert float(timesteps[i]) == pytest.approx(1000 * sigma, rel=1e-5)
        expected = (1 - sigma) * latents[i].double() + sigma * noise[i].double()
        torch.testing.assert_close(noisy[i].double(), expected, rtol=1e-5, atol=1e-6)
    assert 0.3 < float((timesteps > 750).float().mean()) < 0.9  # the shift pushes the draws to high noise


def test_epochs_are_seeded_permutations():
    slots = [batch_indices(5, iteration, 0, 4, 1, 12) for iteration in range(3)]
    assert sorted(sum(slots, [])) == list(range(12))
    assert batch_indices(5, 0, 1, 4, 2, 12) == batch_indices(5, 0, 1, 4, 2, 12)
    assert batch_indices(5, 0, 0, 4, 1, 12) != batch_indices(6, 0, 0, 4, 1, 12)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, toy_root, caplog):
    MagnetTrainer(fresh_adapter(), recipe(iterations=2), ToyShapesMasks(toy_root), tmp_path).train()
    other = MagnetTrainer(fresh_adapter(), recipe(iterations=2, lr_lora=2e-3), ToyShapesMasks(toy_root), tmp_path)
    assert other.resume() == 0
    assert "lr_lora: 0.001 → 0.002" in caplog.text
    assert not list((tmp_path / "checkpoints").glob("iter_*.pt"))


@pytest.mark.parametrize("change, message", [
    ({"protocol": "ade"}, "protocol='ade'"),
    ({"focal_p_t_from": "sigmoid"}, "focal_p_t_from='sigmoid'"),
    ({"checkpoint_policy": "first"}, "checkpoint_policy='first'"),
    ({"iterations": 0}, "iterations must be at least 1"),
])
def test_recipe_errors_name_the_setting(change, message):
    with pytest.raises(ValueError, match=message):
        recipe(**change)


def test_loader_workers_prepare_the_same_examples(tmp_path, toy_root):
    """Examples prepared ahead in worker processes are those the main process would draw: same losses."""
    settings = recipe(iterations=2, conv_head=False)
    inline = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root), tmp_path / "inline")
    inline.train()
    workers = MagnetTrainer(fresh_adapter(), settings, ToyShapesMasks(toy_root), tmp_path / "workers",
                            loader_workers=2)
    workers.train()
    assert [r["loss"] for r in workers.history] == [r["loss"] for r in inline.history]


def test_validation_miou_equals_the_scoring_rules_on_the_same_model(tmp_path, toy_root):
    """The best-checkpoint criterion: the pipeline's extraction + scoring of each layer, recomputed in memory."""
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.magnet.validate import supervised_layer_miou
    from seg4diff_repro.segmentation.score import ScoringSettings, score_layers

    settings = ExtractionSettings.from_dict(dict(
        model="toy_sd3", dataset="toy", backbone="sd3", source=str(TOY_MODEL), dtype="float32", timestep=8,
        num_steps=28, layers=[0, 3], seed=0, short_side=None, resize="stretch", prompt="oracle",
        background_name="background", split="train", background="drop", limit=6))
    manifest = extract_attention(settings, toy_root, tmp_path / "cache", batch_size=6)
    scores = score_layers(tmp_path / "cache/manifest.json", toy_root, ScoringSettings(), tmp_path / "shards")
    assert manifest["layers"] == [0, 3]
    adapter = fresh_adapter()
    for layer in (0, 3):
        expected = float(scores.loc[scores["layer"] == layer, "mIoU"].iloc[0])
        assert supervised_layer_miou(adapter, toy_root, settings, layer, batch_size=6) == pytest.approx(expected, abs=1e-9)


def test_normalized_mask_logits_are_min_max_scaled_per_map(tmp_path, toy_root):
    trainer = MagnetTrainer(fresh_adapter(), recipe(mask_logits="normalized", conv_head=False, protocol="sa1b"),
                            ToyShapesMasks(toy_root, "sa1b"), tmp_path)
    logits = torch.randn(4, 16 * 16, 77, dtype=torch.float64).float() * 5
    maps = trainer._candidates(logits, (16, 16))
    assert maps.shape == (4 * 77, 16, 16)
    flat = maps.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(4 * 77))
    torch.testing.assert_close(flat.amax(1), torch.ones(4 * 77), atol=1e-5, rtol=0)
    # head-major candidate order (head·77 + token), as the official combined index
    expected = (logits[1, :, 5] - logits[1, :, 5].min()) / (logits[1, :, 5].max() - logits[1, :, 5].min() + 1e-6)
    torch.testing.assert_close(maps[77 + 5].flatten(), expected)
