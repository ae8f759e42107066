"""I2T perturbation and perturbed-I2T guidance against float64 references and the stock pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seg4diff_repro.attention import JointLayout
from seg4diff_repro.attention.perturb import I2TPerturbation, gaussian_kernel
from seg4diff_repro.generation.sampling import SamplingSettings, generate, initial_latents
from seg4diff_repro.models.tiny import build_tiny_sd3_pipeline

from test_attention_recorder import block_outputs, inputs, tiny_transformer


def reference_perturbed_attention(query, key, value, layout: JointLayout, kernel: np.ndarray) -> np.ndarray:
    """Full softmax in float64, I2T block blurred with numpy's reflect padding, times V."""
    q, k, v = (t.double().numpy() for t in (query, key, value))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    block = probabilities[:, :, layout.image, layout.text]
    half = len(kernel) // 2
    padded = np.pad(block, [(0, 0)] * 3 + [(half, half)], mode="reflect")
    blurred = sum(w * padded[..., i : i + block.shape[-1]] for i, w in enumerate(kernel))
    probabilities[:, :, layout.image, layout.text] = blurred
    return probabilities @ v


def random_qkv(batch=2, heads=3, n_image=20, n_text=9, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n_image + n_text, dim, generator=generator) for _ in range(3)]


def test_kernel_weights_match_the_paper_setting():
    expected = [0.19754, 0.20123, 0.20247, 0.20123, 0.19754]
    np.testing.assert_allclose(gaussian_kernel(9.0, 5).numpy(), expected, atol=5e-6)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(9.0, 4)


@pytest.mark.parametrize("text_first", [False, True])
def test_perturbed_attention_equals_float64_reference(text_first):
    query, key, value = random_qkv()
    layout = JointLayout(n_image=20, n_text=9, text_first=text_first)
    perturbation = I2TPerturbation(tiny_transformer(), layers=[0])
    actual = perturbation.attend(query, key, value, layout, 0)
    expected = reference_perturbed_attention(query, key, value, layout, gaussian_kernel(9.0, 5).numpy())
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # Text queries are untouched.
    stock = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    assert torch.equal(actual[:, :, layout.text], stock[:, :, layout.text])
    assert not torch.allclose(actual[:, :, layout.image], stock[:, :, layout.image], atol=1e-4)


def test_cond_branch_only_leaves_uncond_rows_bit_identical():
    query, key, value = random_qkv(batch=4)
    layout = JointLayout(n_image=20, n_text=9, text_first=False)
    perturbation = I2TPerturbation(tiny_transformer(), layers=[0], branch="cond")
    actual = perturbation.attend(query, key, value, layout, 0)
    stock = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    assert torch.equal(actual[:2], stock[:2])
    assert not torch.allclose(actual[2:], stock[2:], atol=1e-4)


def test_one_tap_kernel_equals_no_perturbation():
    transformer = tiny_transformer()
    model_inputs = inputs()
    stock = block_outputs(transformer, model_inputs)[-1]
    with I2TPerturbation(transformer, layers=[0, 1, 2], kernel_size=1):
        perturbed = block_outputs(transformer, model_inputs)[-1]
    torch.testing.assert_close(perturbed, stock, rtol=1e-5, atol=1e-5)
    with I2TPerturbation(transformer, layers=[1]):
        blurred = block_outputs(transformer, model_inputs)[-1]
    assert not torch.allclose(blurred, stock, atol=1e-4)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd3_pipeline(seed=0)


def test_plain_sampling_equals_the_stock_pipeline(pipe):
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = generate(pipe, prompts, seeds, SamplingSettings(steps=4, cfg=5.0))
    stock = pipe(
        prompt=prompts, num_inference_steps=4, guidance_scale=5.0, negative_prompt=["", ""],
        latents=initial_latents(pipe, seeds, 64, 64), max_sequence_length=77, output_type="np",
    ).images
    np.testing.assert_allclose(ours.astype(float), np.round(stock * 255), atol=1)


def test_perturbation_and_guidance_change_the_image(pipe):
    base = generate(pipe, ["a red circle"], [5], SamplingSettings(steps=3))
    perturbed = generate(pipe, ["a red circle"], [5], SamplingSettings(steps=3, perturb_layers=(2,)))
    guided = generate(pipe, ["a red circle"], [5], SamplingSettings(steps=3, guidance_layers=(2,)))
    zero_scale = generate(pipe, ["a red circle"], [5], SamplingSettings(steps=3, guidance_layers=(2,), guidance_scale=0))
    assert np.abs(perturbed.astype(int) - base).max() > 0
    assert np.abs(guided.astype(int) - base).max() > 0
    assert np.abs(zero_scale.astype(int) - base).max() <= 1
