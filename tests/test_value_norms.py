"""Recording during generation: exactly the chosen step's conditional-branch call; value norms vs float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seg4diff_repro.attention import AttentionRecorder
from seg4diff_repro.attention.during_generation import (
    StepGatedRecorder,
    generate_and_record,
    prompt_mask,
    step_index,
)
from seg4diff_repro.models.flux import FluxAdapter
from seg4diff_repro.models.sd3 import SD3Adapter
from seg4diff_repro.models.tiny_flux import build_tiny_flux_pipeline

TOY = Path(__file__).resolve().parents[1] / "models" / "toy_sd3"
PROMPT = "One cat and one dog sitting on the grass."  # 12 real CLIP tokens: <sos>, 10 pieces, <eos>
RECORD = ("i2t", "t2i", "value_norms")


@pytest.fixture(scope="module")
def adapter() -> SD3Adapter:
    return SD3Adapter.from_pretrained(TOY)


class CallLog:
    """Keeps (cloned) keyword arguments of every call of `module`."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs) -> None:
        assert not args, "the stock pipelines and blocks pass keyword arguments only"
        self.calls.append({key: value.clone() if torch.is_tensor(value) else value for key, value in kwargs.items()})

    def __enter__(self) -> CallLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


def rows_of(call: dict, rows: slice) -> dict:
    """The call's keyword arguments restricted to batch rows `rows` (batch-free tensors kept whole)."""
    batch = call["hidden_states"].shape[0]
    return {
        key: value[rows] if torch.is_tensor(value) and value.ndim and value.shape[0] == batch else value
        for key, value in call.items()
    }


def manual_recording(transformer, call_kwargs: dict, layers, mask) -> AttentionRecorder:
    with AttentionRecorder(transformer, layers=layers, record=RECORD, heads=None, text_tokens=77) as recorder:
        recorder.prompt_mask = mask
        with torch.no_grad():
            transformer(**call_kwargs)
    return recorder


def test_step_index_convention():
    assert [step_index(k, 28) for k in (28, 8, 1)] == [0, 20, 27]
    assert step_index(8, 50) == 42 and step_index(28, 50) == 22  # official: timesteps[-k] of Flux's 50 steps
    for bad in (0, 29):
        with pytest.raises(ValueError, match="out of range"):
            step_index(bad, 28)


def test_paper_step_convention_puts_t28_first_and_agrees_on_28_steps():
    # Hand-computed: round((28 - k) * 50 / 28), halves up: k = 28 -> 0, k = 8 -> 35.71 -> 36, k = 1 -> 48.2 -> 48;
    # k = 21 -> 12.5 -> 13 (a half, rounded up).
    assert [step_index(k, 50, "paper") for k in (28, 8, 1, 21)] == [0, 36, 48, 13]
    assert [step_index(k, 28, "paper") for k in range(1, 29)] == [step_index(k, 28) for k in range(1, 29)]
    with pytest.raises(ValueError, match="1..28"):
        step_index(29, 50, "paper")  # the paper counts on 28 steps even where the model has 50
    with pytest.raises(ValueError, match="step_convention"):
        step_index(8, 50, "fraction")


@pytest.mark.parametrize("convention, expected", [("official", {28: 22, 8: 42}), ("paper", {28: 0, 8: 36})])
def test_flux_step_convention_records_the_scheduler_step_it_names(convention, expected):
    """The recorded call is the stock pipeline's step at the expected index: compare with the timesteps the
    stock FluxPipeline itself hands its callback at every step, and σ with the scheduler's own sigmas."""
    adapter = FluxAdapter(build_tiny_flux_pipeline(seed=0))
    stock_timesteps = []

    def keep(pipeline, step, timestep, callback_kwargs):
        stock_timesteps.append(float(timestep))
        return {}

    adapter.pipe.set_progress_bar_config(disable=True)
    adapter.pipe(prompt=PROMPT, num_inference_steps=50, height=adapter.image_size, width=adapter.image_size,
                 generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=77, output_type="latent",
                 guidance_scale=adapter.guidance_scale, callback_on_step_end=keep)
    sigmas = adapter.pipe.scheduler.sigmas.double()
    generated = generate_and_record(adapter, PROMPT, 0, [8, 28], 50, layers=[0], record=("value_norms",),
                                    decode=False, step_convention=convention)
    for k, index in expected.items():
        noising = generated.noising[k]
        assert noising.index == index
        assert generated.recordings[k].timestep * 1000 == pytest.approx(stock_timesteps[index], rel=1e-5)
        assert noising.sigma == pytest.approx(float(sigmas[index]), rel=1e-6)
    if convention == "paper":
        assert generated.noising[28].sigma == 1.0  # the first step: pure noise, as t = 28 of 28 for SD3
    else:
        assert generated.noising[28].sigma < 0.9  # index 22 of 50: well into denoising


def test_unknown_branch_is_refused(adapter):
    with pytest.raises(ValueError, match="branch"):
        StepGatedRecorder(adapter.transformer, calls=[0], branch="positive")


def test_gated_recording_is_the_chosen_steps_conditional_call(adapter):
    layers = [0, 3]
    with CallLog(adapter.transformer) as log:
        generated = generate_and_record(
            adapter, PROMPT, 0, [8], 28, cfg=7.5, layers=layers, record=RECORD, heads=None, decode=False
        )
    # Stopped right after step 20 of 28 (index 28 − 8); every call a CFG batch [uncond ; cond].
    assert len(log.calls) == 21
    assert all(call["hidden_states"].shape[0] == 2 for call in log.calls)
    recording, noising = generated.recordings[8], generated.noising[8]
    assert (recording.call, noising.index) == (20, 20)
    assert recording.timestep == pytest.approx(float(log.calls[20]["timestep"][0]))
    assert noising.sigma == pytest.approx(0.51507, abs=1e-4)  # docs/method.md#noising-and-timesteps

    mask = prompt_mask(adapter.tokenizer, PROMPT)
    cond = manual_recording(adapter.transformer, rows_of(log.calls[20], slice(1, 2)), layers, mask)
    uncond = manual_recording(adapter.transformer, rows_of(log.calls[20], slice(0, 1)), layers, mask)
    earlier = manual_recording(adapter.transformer, rows_of(log.calls[19], slice(1, 2)), layers, mask)
    for layer in layers:
        for name in ("i2t", "t2i"):
            got = getattr(recording, name)[layer]
            heads, n_image = adapter.transformer.config.num_attention_heads, adapter.token_grid[0] * adapter.token_grid[1]
            assert got.shape == ((1, heads, n_image, 77) if name == "i2t" else (1, heads, 77, n_image))
            torch.testing.assert_close(got, getattr(cond, name)[layer], rtol=1e-4, atol=1e-6)
            # The other branch and the neighbouring step are measurably different recordings.
            assert (got - getattr(uncond, name)[layer]).abs().max() > 1e-4
            assert (got - getattr(earlier, name)[layer]).abs().max() > 1e-4
        for group in ("image", "text", "prompt"):
            torch.testing.assert_close(recording.value_norms[layer][group], cond.value_norms[layer][group])


def test_recording_leaves_generation_unchanged(adapter):
    generated = generate_and_record(adapter, PROMPT, 3, [8, 28], 28, layers=None, record=RECORD, heads="mean")
    stock = adapter.pipe(
        prompt=PROMPT, num_inference_steps=28, guidance_scale=7.5, height=64, width=64, max_sequence_length=77,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images[0]
    assert generated.image.shape == (64, 64, 3)
    assert (generated.image == stock).all()
    assert sorted(generated.recordings) == [8, 28] and generated.recordings[28].call == 0
    # Each recorded step keeps its own values (the second recorded call does not overwrite the first).
    assert not torch.equal(generated.recordings[8].i2t[0], generated.recordings[28].i2t[0])


def test_value_norms_equal_float64_recomputation_and_use_the_prompt_mask(adapter):
    layer = 3
    attn = adapter.transformer.transformer_blocks[layer].attn
    with CallLog(attn) as log:
        generated = generate_and_record(adapter, PROMPT, 0, [8], 28, layers=[layer], record=("value_norms",),
                                        decode=False)
    call = log.calls[20]  # one attention call per transformer call: the 21st is step 20
    image_states, text_states = call["hidden_states"][1].double(), call["encoder_hidden_states"][1].double()
    heads, dim = attn.heads, attn.inner_dim // attn.heads

    def values(projection, states):  # [tokens, heads, head_dim] in float64
        return F.linear(states, projection.weight.double(), projection.bias.double()).view(-1, heads, dim)

    v_image, v_text = values(attn.to_v, image_states), values(attn.add_v_proj, text_states)[:77]
    mask = prompt_mask(adapter.tokenizer, PROMPT)[0]
    assert int(mask.sum()) == 12 and bool(mask[:12].all())
    expected = {
        "image": v_image.norm(dim=-1).mean(0),
        "text": v_text.norm(dim=-1).mean(0),
        "prompt": v_text[mask].norm(dim=-1).mean(0),
        "image_all_heads": v_image.flatten(1).norm(dim=-1).mean(0),
        "text_all_heads": v_text.flatten(1).norm(dim=-1).mean(0),
        "prompt_all_heads": v_text[mask].flatten(1).norm(dim=-1).mean(0),
    }
    norms = generated.recordings[8].value_norms[layer]
    assert sorted(norms) == sorted(expected)
    for group, value in expected.items():
        torch.testing.assert_close(norms[group][0].double(), value, rtol=1e-5, atol=1e-6)
    # The padding really is left out: over all 77 positions the mean differs.
    assert (norms["prompt"] - norms["text"]).abs().max() > 1e-3


def test_flux_records_the_chosen_step_of_its_single_call_per_step():
    adapter = FluxAdapter(build_tiny_flux_pipeline(seed=0))
    with CallLog(adapter.transformer) as log:
        generated = generate_and_record(
            adapter, PROMPT, 0, [8], 50, layers=None, record=("value_norms",), heads=None, decode=False
        )
    assert len(log.calls) == 43  # steps 0..42 of 50, one call each (guidance-distilled, no CFG batch)
    assert all(call["hidden_states"].shape[0] == 1 for call in log.calls)
    recording = generated.recordings[8]
    # FluxPipeline hands the transformer timestep / 1000.
    assert recording.timestep == pytest.approx(generated.noising[8].timestep / 1000, rel=1e-5)
    mask = prompt_mask(adapter.tokenizer, PROMPT)
    with AttentionRecorder(adapter.transformer, record=("value_norms",), text_tokens=77) as manual:
        manual.prompt_mask = mask
        with torch.no_grad():
            adapter.transformer(**log.calls[42])
    assert sorted(recording.value_norms) == list(range(adapter.num_layers))
    for layer, norms in manual.value_norms.items():
        for group in ("image", "text", "prompt"):
            torch.testing.assert_close(recording.value_norms[layer][group], norms[group])


def test_value_norm_tables_record_the_fingerprint_of_the_model_they_loaded(tmp_path):
    """The value-norms job loads the model itself: both CSVs name its source, revision and content fingerprint,
    and the Fig. 15 table made from them cites the fingerprint."""
    import json

    import pandas as pd

    from seg4diff_repro.cli import main
    from seg4diff_repro.models.common import model_fingerprint
    from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

    model = write_tiny_sd3_pipeline(tmp_path / "model", seed=3)
    settings = {"model": "tiny", "role": "sd3", "backbone": "sd3", "source": str(model), "revision": None,
                "dtype": "float32", "options": {}, "num_steps": 4, "analysis_layer": 1, "toy": True}
    per_head, per_layer = tmp_path / "per_head.csv", tmp_path / "per_layer.csv"
    main(["value-norms", "--model-settings", json.dumps(settings), "--prompts", "1", "--timesteps", "2",
          "--per-head", str(per_head), "--per-layer", str(per_layer)])
    expected = model_fingerprint(model)
    for path in (per_head, per_layer):
        frame = pd.read_csv(path)
        assert set(frame["model_fingerprint"]) == {expected}, path
        assert set(frame["model_source"]) == {str(model)} and frame["model_revision"].isna().all()
    outputs = {ext: tmp_path / f"fig15.{ext}" for ext in ("csv", "md", "png", "pdf")}
    main(["value-norm-heads-figure", "--per-head", str(per_head), "--role", "sd3",
          *(arg for ext, path in outputs.items() for arg in (f"--{'markdown' if ext == 'md' else ext}", str(path)))])
    assert f"model_fingerprint = {expected}" in outputs["md"].read_text()
