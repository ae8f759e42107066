"""AttentionRecorder: stock outputs untouched, maps equal to a float64 recomputation, processors restored."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from seg4diff_repro.attention import AttentionRecorder
from seg4diff_repro.attention.recorder import stop_after_layer

N_TEXT = 154


def tiny_transformer(**extra) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=16, **extra,
    ).eval()


# SD3 (no QK norm) and an SD3.5-like block layout (RMS QK norm, image-only attn2 in the first blocks).
TRANSFORMERS = {
    "sd3": lambda: tiny_transformer(),
    "sd35": lambda: tiny_transformer(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, N_TEXT, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.tensor([515.0] * batch),
        "return_dict": False,
    }


def block_outputs(transformer, model_inputs) -> list:
    """Every joint block's (text, image) outputs and the final output."""
    captured, handles = [], []
    for block in transformer.transformer_blocks:
        handles.append(block.register_forward_hook(lambda module, args, output: captured.append(output)))
    with torch.no_grad():
        final = transformer(**model_inputs)[0]
    for handle in handles:
        handle.remove()
    return [*captured, final]


def projections(transformer, layer: int, model_inputs) -> dict[str, torch.Tensor]:
    """The stock block's own query/key features (after any QK norm), captured with forward hooks."""
    attn = transformer.transformer_blocks[layer].attn
    names = {"to_q": "q_img", "to_k": "k_img", "add_q_proj": "q_txt", "add_k_proj": "k_txt"}
    norms = {"norm_q": "q_img", "norm_k": "k_img", "norm_added_q": "q_txt", "norm_added_k": "k_txt"}
    captured, handles = {}, []
    for module_name, key in {**names, **norms}.items():
        module = getattr(attn, module_name, None)
        if module is not None:
            handles.append(module.register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out)))
    with torch.no_grad():
        transformer(**model_inputs)
    for handle in handles:
        handle.remove()
    heads = attn.heads

    def per_head(x: torch.Tensor) -> torch.Tensor:
        # Linear outputs are [B, N, H·d]; norm outputs are already [B, H, N, d].
        return x if x.dim() == 4 else x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    return {key: per_head(value).double() for key, value in captured.items()}


def reference_maps(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ/√d) over ALL joint keys in float64, sliced to I2T and T2I."""
    query = torch.cat([parts["q_img"], parts["q_txt"]], dim=2)
    key = torch.cat([parts["k_img"], parts["k_txt"]], dim=2)
    probabilities = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
    n_image = parts["q_img"].shape[2]
    return probabilities[:, :, :n_image, n_image:], probabilities[:, :, n_image:, :n_image]


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_block_outputs_bit_identical_to_stock(kind):
    transformer = TRANSFORMERS[kind]()
    model_inputs = inputs()
    stock = block_outputs(transformer, model_inputs)
    with AttentionRecorder(transformer, record=("i2t", "t2i")):
        recorded = block_outputs(transformer, model_inputs)
    assert len(stock) == len(recorded)
    for expected, actual in zip(stock, recorded):
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = actual if isinstance(actual, tuple) else (actual,)
        for e, a in zip(expected, actual):
            assert (e is None and a is None) or torch.equal(e, a)


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_maps_equal_float64_softmax_over_all_joint_keys(kind):
    transformer = TRANSFORMERS[kind]()
    model_inputs = inputs()
    for layer in range(len(transformer.transformer_blocks)):
        i2t_ref, t2i_ref = reference_maps(projections(transformer, layer, model_inputs))
        with AttentionRecorder(transformer, layers=[layer], record=("i2t", "t2i")) as rec:
            with torch.no_grad():
                transformer(**model_inputs)
        assert rec.i2t[layer].dtype == torch.float32
        assert rec.i2t[layer].shape == (2, 4, 64, N_TEXT)
        assert rec.t2i[layer].shape == (2, 4, N_TEXT, 64)
        torch.testing.assert_close(rec.i2t[layer].double(), i2t_ref, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(rec.t2i[layer].double(), t2i_ref, rtol=1e-5, atol=1e-9)
        # The text block alone does not sum to one: image keys share the normalisation.
        assert rec.i2t[layer].sum(-1).max() < 1 - 1e-3


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_stop_after_layer_skips_the_later_blocks_and_records_what_a_full_pass_records(kind):
    transformer = TRANSFORMERS[kind]()
    model_inputs = inputs()
    with AttentionRecorder(transformer, layers=[0, 1], record=("i2t", "logits")) as full, torch.no_grad():
        transformer(**model_inputs)
    ran = []
    handles = [block.register_forward_pre_hook(lambda module, args, index=index: ran.append(index))
               for index, block in enumerate(transformer.transformer_blocks)]
    with AttentionRecorder(transformer, layers=[0, 1], record=("i2t", "logits")) as stopped, \
            stop_after_layer(transformer, 1), torch.no_grad():
        transformer(**model_inputs)
    assert ran == [0, 1]  # block 2 of 3 never ran
    for layer in (0, 1):
        assert torch.equal(stopped.i2t[layer], full.i2t[layer])
        assert torch.equal(stopped.logits_i2t[layer], full.logits_i2t[layer])
    # The stop is gone after the context: a later call runs every block to the stock output.
    ran.clear()
    with torch.no_grad():
        assert torch.equal(transformer(**model_inputs)[0], block_outputs(transformer, model_inputs)[-1])
    assert ran[:3] == [0, 1, 2]
    for handle in handles:
        handle.remove()


def test_head_mean_is_mean_of_heads():
    transformer = tiny_transformer()
    model_inputs = inputs()
    with AttentionRecorder(transformer, layers=[1], heads=None) as per_head, torch.no_grad():
        transformer(**model_inputs)
    with AttentionRecorder(transformer, layers=[1], heads="mean") as mean, torch.no_grad():
        transformer(**model_inputs)
    assert mean.i2t[1].shape == (2, 1, 64, N_TEXT)
    torch.testing.assert_close(mean.i2t[1], per_head.i2t[1].mean(dim=1, keepdim=True))


def test_stock_processors_restored_also_when_body_raises():
    transformer = tiny_transformer()
    before = {name: type(p) for name, p in transformer.attn_processors.items()}
    assert all(cls is JointAttnProcessor2_0 for name, cls in before.items() if ".attn." in name + ".")
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionRecorder(transformer, layers=[0, 2]):
            assert type(transformer.transformer_blocks[0].attn.processor) is not JointAttnProcessor2_0
            raise RuntimeError("boom")
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == before


def test_bad_arguments_name_the_allowed_values():
    transformer = tiny_transformer()
    with pytest.raises(ValueError, match=r"0\.\.2"):
        AttentionRecorder(transformer, layers=[99])
    with pytest.raises(ValueError, match="i2t"):
        AttentionRecorder(transformer, record=("everything",))
    with pytest.raises(ValueError, match="mean"):
        AttentionRecorder(transformer, heads="max")


def test_docstring_example_runs_as_written():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=10, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=32,
    ).eval()
    model_inputs = {
        "hidden_states": torch.randn(1, 4, 32, 32),
        "encoder_hidden_states": torch.randn(1, N_TEXT, 32),
        "pooled_projections": torch.randn(1, 32),
        "timestep": torch.tensor([500.0]),
    }
    namespace = {"transformer": transformer, "inputs": model_inputs}
    example = AttentionRecorder.__doc__.split("Example::")[1].split("\n\n")[1]
    exec(compile("\n".join(line[8:] for line in example.splitlines()), "docstring", "exec"), namespace)
    recorded = namespace["rec"].i2t[9]
    assert recorded.dtype == torch.float32 and recorded.shape == (1, 2, 256, N_TEXT)


def test_logits_value_norms_and_qkv_equal_stock_features():
    transformer = TRANSFORMERS["sd35"]()
    model_inputs = inputs()
    layer = 1
    parts = projections(transformer, layer, model_inputs)
    attn = transformer.transformer_blocks[layer].attn
    values = {}
    hooks = [
        attn.to_v.register_forward_hook(lambda m, a, out: values.__setitem__("image", out)),
        attn.add_v_proj.register_forward_hook(lambda m, a, out: values.__setitem__("text", out)),
    ]
    with torch.no_grad():
        transformer(**model_inputs)
    for hook in hooks:
        hook.remove()
    prompt_mask = torch.zeros(2, 77, dtype=torch.bool)
    prompt_mask[0, :5] = True
    prompt_mask[1, :9] = True
    with AttentionRecorder(
        transformer, layers=[layer], record=("logits", "value_norms", "qkv"), text_tokens=77
    ) as rec, torch.no_grad():
        rec.prompt_mask = prompt_mask
        transformer(**model_inputs)

    scale = parts["q_img"].shape[-1] ** -0.5
    expected_logits = parts["q_img"] @ parts["k_txt"][:, :, :77].transpose(-1, -2) * scale
    torch.testing.assert_close(rec.logits_i2t[layer].double(), expected_logits, rtol=1e-5, atol=1e-5)
    expected_t2i = parts["q_txt"][:, :, :77] @ parts["k_img"].transpose(-1, -2) * scale
    torch.testing.assert_close(rec.logits_t2i[layer].double(), expected_t2i, rtol=1e-5, atol=1e-5)

    heads = attn.heads

    def head_norms(x):  # [B, N, H·d] → per-token, per-head L2 norms [B, H, N], in float64
        return x.double().view(x.shape[0], x.shape[1], heads, -1).norm(dim=-1).transpose(1, 2)

    image_norms, text_norms = head_norms(values["image"]), head_norms(values["text"])[:, :, :77]
    # The recorder computes in float32: compare at float32's tolerance against the float64 references.
    norms = rec.value_norms[layer]
    assert norms["image"].dtype == torch.float32
    torch.testing.assert_close(norms["image"], image_norms.mean(-1).float())
    torch.testing.assert_close(norms["text"], text_norms.mean(-1).float())
    torch.testing.assert_close(norms["prompt"][0], text_norms[0, :, :5].mean(-1).float())
    torch.testing.assert_close(norms["prompt"][1], text_norms[1, :, :9].mean(-1).float())

    torch.testing.assert_close(rec.qkv[layer]["q"], parts["q_img"].transpose(1, 2).flatten(2).float())
    torch.testing.assert_close(rec.qkv[layer]["v"], values["image"])


def test_memory_guard_fails_before_the_forward_pass():
    transformer = tiny_transformer()
    model_inputs = inputs()
    calls = []
    hook = transformer.transformer_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    recorder = AttentionRecorder(transformer, record=("i2t", "t2i", "logits", "qkv"), max_bytes=100_000)
    expected = recorder.estimate_bytes(batch=2, n_image=64, n_text=N_TEXT)
    # 3 layers × (4 maps of [2, 4, 64, 154] + q, k, v of [2, 64, 64]) in float32
    assert expected == 3 * (4 * 2 * 4 * 64 * N_TEXT * 4 + 3 * 2 * 64 * 64 * 4)
    with pytest.raises(MemoryError, match=r"GiB.*record fewer layers, use heads='mean'"):
        with recorder, torch.no_grad():
            transformer(**model_inputs)
    assert calls == []
    hook.remove()
    with AttentionRecorder(transformer, heads="mean", max_bytes=expected) as rec, torch.no_grad():
        transformer(**model_inputs)
    assert set(rec.i2t) == {0, 1, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")
def test_bf16_on_gpu_outputs_bit_identical_and_maps_close():
    transformer = tiny_transformer().cuda().to(torch.bfloat16)
    model_inputs = {k: v.cuda().to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in inputs().items()}
    model_inputs["timestep"] = model_inputs["timestep"].cuda()
    stock = block_outputs(transformer, model_inputs)
    with AttentionRecorder(transformer, record=("i2t",)) as rec:
        recorded = block_outputs(transformer, model_inputs)
    for expected, actual in zip(stock, recorded):
        for e, a in zip(expected if isinstance(expected, tuple) else (expected,),
                        actual if isinstance(actual, tuple) else (actual,)):
            assert (e is None and a is None) or torch.equal(e, a)
    i2t_ref, _ = reference_maps(projections(transformer, 0, model_inputs))
    torch.testing.assert_close(rec.i2t[0].double(), i2t_ref, rtol=2e-2, atol=1e-4)


def test_tiny_sd35_pipeline_roundtrip_and_exact_maps(tmp_path):
    """The SD3.5-layout tiny pipeline, through save_pretrained/from_pretrained, keeps the recorder exact."""
    from diffusers import StableDiffusion3Pipeline

    from seg4diff_repro.models.tiny import TINY_SD35_CONFIG, write_tiny_sd3_pipeline

    write_tiny_sd3_pipeline(tmp_path / "sd35", config=TINY_SD35_CONFIG, seed=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd35", text_encoder_3=None, tokenizer_3=None)
    transformer = pipe.transformer
    assert transformer.transformer_blocks[0].attn2 is not None and transformer.transformer_blocks[0].attn.norm_q is not None
    generator = torch.Generator().manual_seed(2)
    model_inputs = {
        "hidden_states": torch.randn(1, 16, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(1, N_TEXT, 64, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([515.0]),
        "return_dict": False,
    }
    stock = block_outputs(transformer, model_inputs)
    with AttentionRecorder(transformer, layers=[0, 4], record=("i2t", "t2i")) as rec:
        recorded = block_outputs(transformer, model_inputs)
    assert all(torch.equal(a, b) for e, r in zip(stock, recorded)
               for a, b in zip(e if isinstance(e, tuple) else (e,), r if isinstance(r, tuple) else (r,))
               if a is not None)
    for layer in (0, 4):
        i2t_ref, t2i_ref = reference_maps(projections(transformer, layer, model_inputs))
        torch.testing.assert_close(rec.i2t[layer].double(), i2t_ref, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(rec.t2i[layer].double(), t2i_ref, rtol=1e-5, atol=1e-9)


FUSED_KERNEL_CHECK = """
import json, torch
from seg4diff_repro.attention.fused import head_mean_map
torch.manual_seed(0)
batch, heads, tokens, head_dim = 2, 3, 100, 16
# [B, N, H, D] transposed to [B, H, N, D], as the attention processors hand q and k over: not contiguous.
query = torch.randn(batch, tokens, heads, head_dim).to(torch.float16).transpose(1, 2)
key = torch.randn(batch, tokens, heads, head_dim).to(torch.float16).transpose(1, 2)
scale = head_dim ** -0.5
q64, k64 = query.double(), key.double()
lse = torch.logsumexp(q64 @ k64.transpose(-1, -2) * scale, dim=-1)
errors = []
for rows, columns in ((slice(20, 100), slice(0, 20)), (slice(0, 20), slice(20, 100))):
    fused = head_mean_map(query, key, lse.float(), rows, columns, scale)
    reference = torch.exp(q64[:, :, rows] @ k64[:, :, columns].transpose(-1, -2) * scale - lse[:, :, rows, None])
    errors.append([list(fused.shape), (fused.double() - reference.mean(1, keepdim=True)).abs().max().item()])
print(json.dumps(errors))
"""


def test_fused_head_mean_kernel_equals_a_float64_recomputation_in_tritons_interpreter():
    """The Triton kernel's arithmetic, run by Triton's CPU interpreter (float16: numpy has no bfloat16)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="this torch build ships no Triton (the recorder then uses torch ops)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", FUSED_KERNEL_CHECK], env=env, capture_output=True, text=True,
                            check=True)
    (shape_i2t, error_i2t), (shape_t2i, error_t2i) = json.loads(result.stdout.strip().splitlines()[-1])
    assert shape_i2t == [2, 1, 80, 20] and shape_t2i == [2, 1, 20, 80]
    assert error_i2t < 1e-6 and error_t2i < 1e-6  # float32 accumulation of exact half-precision products


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")
def test_fused_head_mean_maps_on_gpu_equal_the_torch_path_and_outputs_stay_bit_identical():
    from seg4diff_repro.attention.fused import fused_head_mean_supported

    transformer = tiny_transformer().cuda().to(torch.bfloat16)
    model_inputs = {k: v.cuda().to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in inputs().items()}
    model_inputs["timestep"] = model_inputs["timestep"].cuda()
    assert fused_head_mean_supported(torch.zeros(1, 1, 1, 16, device="cuda", dtype=torch.bfloat16))
    stock = block_outputs(transformer, model_inputs)
    maps = {}
    for fused in (True, False):
        with AttentionRecorder(transformer, record=("i2t", "t2i"), heads="mean", fused=fused) as rec:
            recorded = block_outputs(transformer, model_inputs)
        maps[fused] = (rec.i2t, rec.t2i)
        for expected, actual in zip(stock, recorded):
            for e, a in zip(expected if isinstance(expected, tuple) else (expected,),
                            actual if isinstance(actual, tuple) else (actual,)):
                assert (e is None and a is None) or torch.equal(e, a)
    for fused_maps, torch_maps in zip(maps[True], maps[False]):
        assert fused_maps.keys() == torch_maps.keys()
        for layer in fused_maps:
            torch.testing.assert_close(fused_maps[layer], torch_maps[layer], rtol=1e-4, atol=1e-6)
