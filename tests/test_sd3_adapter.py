"""SD3Adapter against stock diffusers recomputed by hand, the published numbers of docs/method.md#noising-and-timesteps,
and real Hugging Face hub error exchanges (a local HTTP server that answers like the hub does for gated repos)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from seg4diff_repro.models.sd3 import ModelLoadError, Noising, SD3Adapter, load_sd3_pipeline
from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

GATED_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"
PROMPTS = ["a red circle", "", "car mountain sky water"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3_adapter") / "tiny", seed=0)


@pytest.fixture(scope="module")
def adapter(tiny_folder: Path) -> SD3Adapter:
    return SD3Adapter.from_pretrained(tiny_folder)


def stock_scheduler(num_steps: int = 28) -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler built from scratch (not the pipeline's instance): 1000 train steps, shift 3.0."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler


# --------------------------------------------------------------------------------------------- noising


def test_noising_k8_of_28_matches_spec(adapter: SD3Adapter) -> None:
    noising = adapter.noising(8, 28)
    assert isinstance(noising, Noising)
    assert (noising.k, noising.num_steps, noising.index) == (8, 28, 20)
    # Published values, docs/method.md#noising-and-timesteps.
    assert noising.sigma == pytest.approx(0.51507, abs=1e-4)
    # 515.07 is σ·1000 with σ given to 5 decimals, so the timestep is known to ±0.01 (it is 515.0721).
    assert noising.timestep / 1000 == pytest.approx(0.51507, abs=1e-4)
    assert noising.timestep == pytest.approx(515.07, abs=1e-2)
    # The official code's convention: timesteps[-8] of a stock 28-step SD3 schedule.
    reference = stock_scheduler(28)
    assert noising.timestep == float(reference.timesteps[-8])
    assert noising.sigma == float(reference.sigmas[len(reference.timesteps) - 8])


def test_noising_schedule_ends(adapter: SD3Adapter) -> None:
    assert adapter.noising(28, 28).sigma == pytest.approx(1.0, abs=1e-6)
    assert adapter.noising(28, 28).index == 0
    last = adapter.noising(1, 28)
    assert last.index == 27
    assert last.sigma == pytest.approx(0.00893, abs=1e-4)


@pytest.mark.parametrize("k", [0, 29, -1])
def test_noising_out_of_range(adapter: SD3Adapter, k: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.28"):
        adapter.noising(k, 28)


# --------------------------------------------------------------------------------------------- encode / noise


def test_encode_images_is_normalised_posterior_mean(adapter: SD3Adapter) -> None:
    vae = adapter.pipe.vae
    # SD3's latent normalisation (docs/method.md#image-preprocessing), which the tiny VAE copies.
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5305)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = vae.encode(2 * images - 1).latent_dist.mean
        sample = vae.encode(2 * images - 1).latent_dist.sample(torch.Generator().manual_seed(0))
    expected = (mean - 0.0609) * 1.5305
    first, second = adapter.encode_images(images), adapter.encode_images(images)
    assert first.shape == (2, 16, 32, 32)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    assert torch.equal(first, second)  # no sampling
    assert not torch.allclose(first, (sample - 0.0609) * 1.5305, atol=1e-3)  # ... and a sample would differ


def test_noise_latents_is_flow_matching_mix_with_per_image_seeds(adapter: SD3Adapter) -> None:
    noising = adapter.noising(8, 28)
    sigma = float(stock_scheduler(28).sigmas[20])
    latents = torch.randn(3, 16, 32, 32, generator=torch.Generator().manual_seed(123))
    seeds = [11, 22, 33]
    noisy = adapter.noise_latents(latents, noising, seeds)
    eps = torch.stack([torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * eps, rtol=1e-5, atol=1e-5)

    # An image's noise depends on its own seed only, not on its batch position or neighbours.
    alone = adapter.noise_latents(latents[:1], noising, [11])
    other = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(7))
    second = adapter.noise_latents(torch.cat([other, latents[:1]]), noising, [5, 11])
    assert torch.equal(second[1], alone[0])
    assert not torch.allclose(second[0], alone[0])


# --------------------------------------------------------------------------------------------- prompts


def _clip_by_hand(tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def test_encode_prompts_matches_clip_by_hand(adapter: SD3Adapter) -> None:
    pipe = adapter.pipe
    embeds, pooled = adapter.encode_prompts(PROMPTS)
    dim = pipe.transformer.config.joint_attention_dim
    assert embeds.shape == (3, 154, dim)
    assert adapter.num_text_tokens == 154

    states_l, pooled_l = _clip_by_hand(pipe.tokenizer, pipe.text_encoder, PROMPTS)
    states_g, pooled_g = _clip_by_hand(pipe.tokenizer_2, pipe.text_encoder_2, PROMPTS)
    clip = torch.cat([states_l, states_g], dim=-1)
    clip = F.pad(clip, (0, dim - clip.shape[-1]))
    torch.testing.assert_close(embeds[:, :77], clip, rtol=1e-5, atol=1e-6)
    assert embeds[:, :77].abs().amax() > 0
    assert torch.count_nonzero(embeds[:, 77:]) == 0  # the absent T5 block
    torch.testing.assert_close(pooled, torch.cat([pooled_l, pooled_g], dim=-1), rtol=1e-5, atol=1e-6)
    assert pooled.shape == (3, pipe.transformer.config.pooled_projection_dim)


# --------------------------------------------------------------------------------------------- forward


def test_forward_equals_direct_transformer_call(adapter: SD3Adapter) -> None:
    noising = adapter.noising(8, 28)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    noisy = adapter.noise_latents(adapter.encode_images(images), noising, [0, 1])
    embeds, pooled = adapter.encode_prompts(PROMPTS[:2])
    out = adapter.forward(noisy, noising, embeds, pooled)
    # Timestep as the stock pipeline passes it: scheduler.timesteps[i].expand(batch).
    timestep = stock_scheduler(28).timesteps[-8].expand(2)
    with torch.no_grad():
        expected = adapter.pipe.transformer(
            hidden_states=noisy,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    assert out.shape == noisy.shape
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------- loading errors


def test_folder_without_model_index(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        load_sd3_pipeline(folder)
    assert str(folder) in str(info.value)
    assert "model_index.json" in str(info.value)


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as huggingface.co does for a gated repo without a token."""

    paths: list[str]

    def _gated(self) -> None:
        self.paths.append(self.path)
        body = json.dumps({"error": f"Access to model {GATED_REPO} is restricted."}).encode()
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header(
            "X-Error-Message",
            f"Access to model {GATED_REPO} is restricted. You must have access to it and be authenticated "
            "to access it. Please log in.",
        )
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _gated

    def log_message(self, *args) -> None:
        pass


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from seg4diff_repro.models.sd3 import ModelLoadError, load_sd3_pipeline
    try:
        load_sd3_pipeline(sys.argv[1])
        print(json.dumps({"type": None, "message": "loaded"}))
    except Exception as error:
        print(json.dumps({"type": type(error).__name__, "model_load_error": isinstance(error, ModelLoadError),
                          "message": str(error)}))
    """
)


def _load_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(HF_HOME=str(home), **extra)  # fresh cache, no token file, no HF_TOKEN
    return env


@pytest.fixture(scope="module")
def hub_failures(tmp_path_factory: pytest.TempPathFactory):
    """Both hub loads run at once in subprocesses (HF_ENDPOINT / HF_HUB_OFFLINE are read at import time)."""
    handler = type("Handler", (_GatedHub,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        gated_home, offline_home = tmp_path_factory.mktemp("hf_gated"), tmp_path_factory.mktemp("hf_offline")
        runs = {
            "gated": (GATED_REPO, _load_env(gated_home, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")),
            # The endpoint is the local server too, so a leak past offline mode would show up in `paths`.
            "offline": ("someone/not-cached-model", _load_env(offline_home, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1")),
        }
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-c", _LOAD_SCRIPT, repo], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for name, (repo, env) in runs.items()
        }
        results = {}
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"{name} load did not finish in 120 s")
            assert proc.returncode == 0, stderr[-3000:]
            results[name] = json.loads(stdout.strip().splitlines()[-1])
        yield results, list(handler.paths)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_gated_model_without_token_says_how_to_log_in(hub_failures) -> None:
    results, paths = hub_failures
    result = results["gated"]
    assert any(GATED_REPO in p for p in paths), paths  # the hub client really talked to our server
    assert result["model_load_error"], result
    message = result["message"]
    assert GATED_REPO in message
    assert "gated" in message
    assert "hf auth login" in message
    assert "HF_TOKEN" in message


def test_offline_and_not_cached_says_so(hub_failures) -> None:
    results, paths = hub_failures
    result = results["offline"]
    assert result["model_load_error"], result
    message = result["message"]
    assert "someone/not-cached-model" in message
    assert "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message
    assert not any("not-cached-model" in p for p in paths), paths  # offline means no request


def test_missing_local_folder_is_named_not_sent_to_the_hub(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="does not exist and is not a Hugging Face id"):
        load_sd3_pipeline(missing)
