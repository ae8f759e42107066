"""The rehearsal's random-weight pipelines have the released models' sizes (built on the meta device: no memory)."""

from __future__ import annotations

import pytest

from seg4diff_repro.models.released import build_released_random_pipeline

# Parameter counts of the released checkpoints (their safetensors): the MM-DiT of SD3-medium (2.03 B),
# SD3.5-medium (2.24 B) and FLUX.1-dev (11.9 B), CLIP ViT-L/14 and OpenCLIP bigG text towers with projection,
# FLUX.1-dev's CLIP-L text model without projection, and T5 v1.1 XXL's encoder (4.76 B).
RELEASED_COUNTS = {
    "sd3": {"transformer": 2_028_328_000, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840},
    "sd35": {"transformer": 2_243_171_520, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840},
    "flux": {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656},
}


@pytest.mark.parametrize("variant", sorted(RELEASED_COUNTS))
def test_random_pipelines_have_the_released_sizes(variant):
    pipe = build_released_random_pipeline(variant, device="meta")
    for component, count in RELEASED_COUNTS[variant].items():
        assert sum(p.numel() for p in getattr(pipe, component).parameters()) == count, component
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.sample_size == 1024
    assert pipe.transformer.dtype.is_floating_point and str(pipe.transformer.dtype) == "torch.float16"
    if variant != "flux":
        assert pipe.text_encoder_3 is None  # the protocol runs SD3 without T5
