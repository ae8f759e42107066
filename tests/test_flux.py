"""Flux: hooked processors bit-identical to stock, maps equal a float64 recomputation (RoPE included),
the official timestep numbers, the offline T5 tokenizer and the tiny FluxPipeline through stock diffusers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from seg4diff_repro.attention import AttentionHooks, AttentionRecorder, backend_for
from seg4diff_repro.attention.flux import FluxBackend, HookedFluxAttnProcessor
from seg4diff_repro.models import t5_tokenizer
from seg4diff_repro.models.flux import FLUX_DEV_SCHEDULER_CONFIG, FluxAdapter, flux_mu, flux_noising
from seg4diff_repro.models.t5_tokenizer import build_t5_tokenizer, train_t5_vocab
from seg4diff_repro.models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline, write_tiny_flux_pipeline

RECORD = ("i2t", "t2i", "logits", "value_norms", "qkv")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
N_TEXT, N_IMAGE, HEADS = 77, 256, 2
PROMPTS = ["car mountain sky water", "a red circle and a blue square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "tiny_flux", seed=0)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> FluxPipeline:
    return FluxPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def adapter(pipe: FluxPipeline) -> FluxAdapter:
    return FluxAdapter(pipe)


@pytest.fixture(scope="module")
def model_inputs(adapter: FluxAdapter) -> dict:
    """A batch of 2 as the adapter gives it to the transformer: real prompts, noised encoded images."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noising = adapter.noising(8)
    noisy = adapter.noise_latents(adapter.encode_images(images), noising, seeds=[0, 1])
    embeds, pooled = adapter.encode_prompts(PROMPTS)
    return adapter.transformer_inputs(noisy, noising, embeds, pooled)


def blocks(transformer) -> list:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def block_outputs(transformer, inputs: dict) -> list:
    """Every double- and single-stream block's (text, image) outputs and the final output."""
    captured = []
    handles = [b.register_forward_hook(lambda m, a, out: captured.append(out)) for b in blocks(transformer)]
    with torch.no_grad():
        final = transformer(**inputs)[0]
    for handle in handles:
        handle.remove()
    return [*captured, final]


def stock_qkv(transformer, inputs: dict) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, the stock processor's joint q/k/v [B, H, N, D] in float64, rebuilt from forward hooks.

    Hooks on to_q/to_k/to_v, add_*_proj and the QK norms give the stock block's own features; the
    joint sequence is [text ; image] and RoPE is applied with diffusers' `apply_rotary_emb` to the
    float32 features, with the rotary embedding the transformer passed to the attention module.
    """
    captured, handles = {}, []
    for layer, block in enumerate(blocks(transformer)):
        attn, store = block.attn, captured.setdefault(layer, {})

        def keep(name, store=store):
            return lambda module, args, out: store.__setitem__(name, out)

        for name in ("to_v", "add_v_proj", "norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            if hasattr(attn, name):
                handles.append(getattr(attn, name).register_forward_hook(keep(name)))
        for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"):  # pre-norm features, checked to feed the norms
            if hasattr(attn, name):
                handles.append(getattr(attn, name).register_forward_hook(keep(name)))
        handles.append(
            attn.register_forward_pre_hook(
                lambda module, args, kwargs, store=store: store.__setitem__("rope", kwargs["image_rotary_emb"]),
                with_kwargs=True,
            )
        )
    with torch.no_grad():
        transformer(**inputs)
    for handle in handles:
        handle.remove()

    result = {}
    for layer, parts in captured.items():
        head_dim = transformer.config.attention_head_dim
        for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
            if name in parts:  # the RMS norms ran on exactly these projections
                norm = {"to_q": "norm_q", "to_k": "norm_k", "add_q_proj": "norm_added_q", "add_k_proj": "norm_added_k"}
                module = getattr(blocks(transformer)[layer].attn, norm[name])
                assert torch.equal(module(parts[name].unflatten(-1, (-1, head_dim))), parts[norm[name]])
        q, k, v = parts["norm_q"], parts["norm_k"], parts["to_v"].unflatten(-1, (-1, head_dim))
        if "norm_added_q" in parts:
            q = torch.cat([parts["norm_added_q"], q], dim=1)
            k = torch.cat([parts["norm_added_k"], k], dim=1)
            v = torch.cat([parts["add_v_proj"].unflatten(-1, (-1, head_dim)), v], dim=1)
        q = apply_rotary_emb(q, parts["rope"], sequence_dim=1)
        k = apply_rotary_emb(k, parts["rope"], sequence_dim=1)
        result[layer] = {name: x.transpose(1, 2).double() for name, x in (("q", q), ("k", k), ("v", v))}
    return result


# ------------------------------------------------------------------------------------ attention hooks


def test_block_outputs_bit_identical_to_stock_all_layers(pipe, model_inputs):
    transformer = pipe.transformer
    stock = block_outputs(transformer, model_inputs)
    with AttentionRecorder(transformer, record=RECORD) as rec:
        assert rec.layers == [0, 1, 2, 3]
        recorded = block_outputs(transformer, model_inputs)
    assert len(stock) == len(recorded) == 5
    for expected, actual in zip(stock, recorded):
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = actual if isinstance(actual, tuple) else (actual,)
        for e, a in zip(expected, actual, strict=True):
            assert torch.equal(e, a)
    for layer in range(4):
        assert rec.i2t[layer].shape == (2, HEADS, N_IMAGE, N_TEXT) and rec.i2t[layer].dtype == torch.float32
        assert rec.t2i[layer].shape == (2, HEADS, N_TEXT, N_IMAGE)
        assert rec.logits_i2t[layer].shape == (2, HEADS, N_IMAGE, N_TEXT)
        assert rec.qkv[layer]["q"].shape == (2, N_IMAGE, 32)
        assert rec.value_norms[layer]["text"].shape == (2, HEADS)


def test_hooked_processor_alone_is_bit_identical_to_stock_processor(pipe, model_inputs):
    """Both processor kinds called directly on the same inputs, outside the recorder."""
    transformer = pipe.transformer
    attns = {"double": transformer.transformer_blocks[1].attn, "single": transformer.single_transformer_blocks[0].attn}
    captured, handles = {}, []
    for name, attn in attns.items():

        def keep(module, args, kwargs, name=name):
            captured[name] = dict(kwargs)

        handles.append(attn.register_forward_pre_hook(keep, with_kwargs=True))
    with torch.no_grad():
        transformer(**model_inputs)
    for handle in handles:
        handle.remove()
    for name, attn in attns.items():
        kwargs = captured[name]
        hooked = HookedFluxAttnProcessor(AttentionHooks(), layer=0, text_tokens_of_call=lambda: N_TEXT)
        with torch.no_grad():
            expected = FluxAttnProcessor()(attn, **kwargs)
            actual = hooked(attn, **kwargs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = actual if isinstance(actual, tuple) else (actual,)
        assert len(expected) == len(actual) == (2 if name == "double" else 1)
        assert all(torch.equal(e, a) for e, a in zip(expected, actual))


def test_maps_equal_float64_softmax_over_all_joint_keys(pipe, model_inputs):
    transformer = pipe.transformer
    reference = stock_qkv(transformer, model_inputs)
    with AttentionRecorder(transformer, record=RECORD) as rec, torch.no_grad():
        transformer(**model_inputs)
    for layer, parts in reference.items():
        q, k, v = parts["q"], parts["k"], parts["v"]
        assert q.shape == (2, HEADS, N_TEXT + N_IMAGE, 16)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        probabilities = torch.softmax(logits, dim=-1)
        # Flux is text first: I2T = image rows (the last n_image) x text columns (the first n_text).
        i2t, t2i = probabilities[:, :, -N_IMAGE:, :N_TEXT], probabilities[:, :, :N_TEXT, -N_IMAGE:]
        torch.testing.assert_close(rec.i2t[layer].double(), i2t, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(rec.t2i[layer].double(), t2i, rtol=1e-5, atol=1e-9)
        i2t_logits, t2i_logits = logits[:, :, -N_IMAGE:, :N_TEXT], logits[:, :, :N_TEXT, -N_IMAGE:]
        for recorded, expected in ((rec.logits_i2t, i2t_logits), (rec.logits_t2i, t2i_logits)):
            torch.testing.assert_close(recorded[layer].double(), expected, rtol=1e-5, atol=1e-5)
        for name, x in (("q", q), ("k", k), ("v", v)):
            image = x[:, :, -N_IMAGE:].transpose(1, 2).flatten(2)
            torch.testing.assert_close(rec.qkv[layer][name].double(), image, rtol=0, atol=0)
        norms = v.norm(dim=-1)
        # The recorder computes the norms in float32: float32's tolerance against the float64 reference.
        float32 = dict(rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(rec.value_norms[layer]["text"].double(), norms[:, :, :N_TEXT].mean(-1), **float32)
        torch.testing.assert_close(rec.value_norms[layer]["image"].double(), norms[:, :, -N_IMAGE:].mean(-1), **float32)
        # Image keys share the normalisation, so a text block's row does not sum to one.
        assert rec.i2t[layer].sum(-1).max() < 1 - 1e-3


def test_stock_processors_restored_also_when_body_raises(pipe):
    transformer = pipe.transformer
    before = {name: type(p) for name, p in transformer.attn_processors.items()}
    assert len(before) == 4 and set(before.values()) == {FluxAttnProcessor}
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionRecorder(transformer, layers=[1, 3]):
            assert type(transformer.transformer_blocks[1].attn.processor) is HookedFluxAttnProcessor
            assert type(transformer.single_transformer_blocks[1].attn.processor) is HookedFluxAttnProcessor
            assert type(transformer.transformer_blocks[0].attn.processor) is FluxAttnProcessor
            raise RuntimeError("boom")
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == before


def test_layer_numbering_57_blocks():
    """FLUX.1-dev's block counts: 19 double-stream blocks are layers 0..18, 38 single-stream blocks 19..56."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=4, num_layers=19, num_single_layers=38, attention_head_dim=6, num_attention_heads=1,
        joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 2),
    )
    backend = backend_for(transformer)
    assert isinstance(backend, FluxBackend) and backend.name == "flux"
    modules = backend.attention_modules(transformer)
    assert len(modules) == 57
    assert modules[18] is transformer.transformer_blocks[18].attn
    assert modules[19] is transformer.single_transformer_blocks[0].attn
    assert modules[56] is transformer.single_transformer_blocks[37].attn
    assert (modules[0].heads, modules[0].inner_dim) == (1, 6)  # read by AttentionRecorder.estimate_bytes
    with pytest.raises(ValueError, match=r"0\.\.56"):
        AttentionRecorder(transformer, layers=[57])


def test_token_counts_and_single_stream_needs_them(pipe, model_inputs):
    transformer = pipe.transformer
    backend = FluxBackend()
    kwargs = {k: v for k, v in model_inputs.items() if k != "hidden_states"}
    assert backend.token_counts(transformer, (model_inputs["hidden_states"],), kwargs) == (2, N_IMAGE, N_TEXT)
    assert backend.n_text == N_TEXT
    attn = transformer.single_transformer_blocks[0].attn
    stock = attn.processor
    attn.set_processor(FluxBackend().processor(AttentionHooks(), 2, transformer))  # no pre-hook: count unknown
    try:
        with pytest.raises(RuntimeError, match="single-stream"), torch.no_grad():
            transformer(**model_inputs)
    finally:
        attn.set_processor(stock)


# -------------------------------------------------------------------------------------------- timesteps


def test_official_sigma_numbers_with_real_flux_scheduler():
    """docs/method.md#flux-specifics: mu from the 16 latent channels (bug) vs from 4096 image tokens (fix)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    bug = flux_mu(scheduler.config, image_seq_len=4096, latent_channels=16, mu_from_channels=True)
    fix = flux_mu(scheduler.config, image_seq_len=4096, latent_channels=16, mu_from_channels=False)
    assert bug == pytest.approx(0.4594, abs=1e-4) and fix == pytest.approx(1.15)
    noising = flux_noising(scheduler, 8, 50, bug)
    assert (noising.k, noising.num_steps, noising.index) == (8, 50, 42)
    assert noising.sigma == pytest.approx(0.2317, abs=5e-5)
    assert noising.timestep == float(scheduler.timesteps[-8])
    assert flux_noising(scheduler, 8, 50, fix).sigma == pytest.approx(0.3756, abs=5e-5)
    # The stock FluxPipeline schedule for 4096 tokens is the "fix" one.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=calculate_shift(4096))
    assert float(scheduler.sigmas[42]) == pytest.approx(0.3756, abs=5e-5)


def test_adapter_schedule_and_layout(pipe):
    assert {k: pipe.scheduler.config[k] for k in FLUX_DEV_SCHEDULER_CONFIG} == FLUX_DEV_SCHEDULER_CONFIG
    adapter = FluxAdapter(pipe)
    assert (adapter.backbone, adapter.image_first, adapter.prompt_start) == ("flux", False, 0)
    sizes = (adapter.num_layers, adapter.image_size, adapter.token_grid, adapter.num_text_tokens)
    assert sizes == (4, 64, (16, 16), 77)
    # The bug makes mu independent of the image size: the 16-channel value, as for FLUX.1-dev at 1024².
    assert adapter.mu == pytest.approx(0.4594, abs=1e-4)
    assert adapter.noising(8).sigma == pytest.approx(0.2317, abs=5e-5)
    fixed = FluxAdapter(pipe, mu_from_channels=False)
    assert fixed.mu == pytest.approx(0.5)  # 256 image tokens = base_image_seq_len
    with pytest.raises(ValueError, match="1..50"):
        adapter.noising(51)


# ---------------------------------------------------------------------------------------------- adapter


def test_adapter_matches_flux_pipeline_conventions(pipe, model_inputs):
    adapter = FluxAdapter(pipe)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    vae = pipe.vae
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mean
        unit = vae.encode(2 * images - 1).latent_dist.mean
    torch.testing.assert_close(adapter.encode_images(images), (raw - 0.1159) * 0.3611, rtol=0, atol=0)
    scaled = FluxAdapter(pipe, scale_to_unit_range=True).encode_images(images)
    torch.testing.assert_close(scaled, (unit - 0.1159) * 0.3611, rtol=0, atol=0)

    noising = adapter.noising(8)
    latents = adapter.encode_images(images)
    noisy = adapter.noise_latents(latents, noising, seeds=[5, 6])
    noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor(noising.sigma)
    torch.testing.assert_close(noisy[1], (1 - sigma) * latents[1] + sigma * noise)

    # Transformer inputs as FluxPipeline builds them (pack, ids, timestep/1000, guidance 3.5).
    _, image_ids = pipe.prepare_latents(2, 16, 64, 64, torch.float32, "cpu", None, latents=noisy)
    inputs = model_inputs
    assert torch.equal(inputs["img_ids"], image_ids) and inputs["img_ids"].shape == (N_IMAGE, 3)
    assert torch.equal(inputs["txt_ids"], torch.zeros(N_TEXT, 3))
    assert inputs["hidden_states"].shape == (2, N_IMAGE, 64)
    assert torch.equal(inputs["timestep"], torch.full((2,), noising.timestep) / 1000)
    assert torch.equal(inputs["guidance"], torch.full((2,), 3.5))
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=77)
    assert torch.equal(inputs["encoder_hidden_states"], embeds) and torch.equal(inputs["pooled_projections"], pooled)
    packed = pipe._pack_latents(noisy, 2, 16, 32, 32)
    assert torch.equal(pipe._unpack_latents(packed, 64, 64, 2), noisy)
    prediction = adapter.forward(noisy, noising, *adapter.encode_prompts(PROMPTS))
    assert prediction.shape == (2, 16, 32, 32)


# -------------------------------------------------------------------------------------------- tokenizer


def test_t5_tokenizer_roundtrip_and_class_name_counts(pipe, tmp_path):
    built = build_t5_tokenizer()
    loaded = pipe.tokenizer_2
    direct = build_t5_tokenizer(tmp_path)
    assert isinstance(loaded, T5Tokenizer) and sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"
    ]
    prompts = ["car mountain sky water", "diningtable pottedplant tvmonitor", "A sign that says ’Hello World’.", ""]
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
    for tokenizer in (loaded, direct):
        assert tokenizer(prompts, **kwargs).input_ids == built(prompts, **kwargs).input_ids
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        assert len(tokenizer) == len(built) and tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(built) - 1
    assert pipe.text_encoder_2.config.vocab_size == len(built)

    # A class's tokens, counted without </s>, sit at consecutive positions from 0 in the joined prompt.
    voc21 = Path(__file__).parents[1] / "src/seg4diff_repro/data/classes/voc21.json"
    names = json.loads(voc21.read_text())["names"]
    ids = loaded(" ".join(names)).input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1]
    position = 0
    for name in names:
        with_eos = loaded(name).input_ids
        assert with_eos[-1] == 1
        count = len(with_eos) - 1
        assert count == len(loaded(name, add_special_tokens=False).input_ids) >= 1
        assert ids[position : position + count] == with_eos[:-1], name
        position += count
    assert position == len(ids) - 1
    assert 2 not in ids  # no <unk> in class names
    assert loaded("").input_ids == [1]
    assert train_t5_vocab() == train_t5_vocab()


def test_t5_vocabulary_is_the_same_in_a_fresh_process():
    """The tokenizers trainer's scores vary between processes; the canonical vocabulary must not."""
    # Load the module file alone: importing the package's `models` would pull in diffusers (seconds).
    code = (
        "import hashlib, importlib.util, json, sys; "
        "spec = importlib.util.spec_from_file_location('t5tok', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "print(hashlib.sha256(json.dumps(module.train_t5_vocab()).encode()).hexdigest())"
    )
    here = hashlib.sha256(json.dumps(train_t5_vocab()).encode()).hexdigest()
    source = t5_tokenizer.__file__
    run = subprocess.run([sys.executable, "-c", code, source], capture_output=True, text=True, check=True)
    out = run.stdout.split()
    assert out[-1] == here


# ------------------------------------------------------------------------------------ tiny Flux pipeline


def test_folder_layout_and_weights_roundtrip(folder, pipe):
    info = json.loads((folder / "seg4diff_model.json").read_text())
    config = json.loads(json.dumps(asdict(TinyFluxConfig())))
    assert info == {"kind": "tiny-random", "backbone": "flux", "seed": 0, "config": config}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 2
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    config = pipe.transformer.config
    assert (config.in_channels, config.joint_attention_dim, config.pooled_projection_dim) == (64, 32, 32)
    assert config.guidance_embeds and sum(config.axes_dims_rope) == config.attention_head_dim
    built = build_tiny_flux_pipeline(seed=0)
    for name in COMPONENTS:
        a, b = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert getattr(pipe, name).dtype == torch.float32


def test_stock_flux_pipeline_runs_end_to_end(pipe):
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyFluxConfig(axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="image_size=66"):
        TinyFluxConfig(image_size=66)
