"""Test MAGNET adapters made by hand (the contract's recipe, before a trained one exists): the toy model's
transformer with a fresh LoRA whose B matrices are perturbed (peft's Gaussian init leaves B = 0: no effect)."""

from __future__ import annotations

from pathlib import Path

import torch

from seg4diff_repro.magnet.lora import add_lora, save_adapter

TOY_MODEL = Path(__file__).resolve().parents[1] / "models" / "toy_sd3"


def make_toy_adapter(folder: Path, *, run: str = "toy_sd3_coco", protocol: str = "coco", seed: int = 0,
                     rank: int = 16, alpha: int = 16, scale: float = 0.05, iteration: int = 7) -> Path:
    """Write an adapter folder for the committed toy model: A from peft's Gaussian init, B ~ scale · N(0, 1)."""
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(TOY_MODEL)
    torch.manual_seed(seed)
    parameters = add_lora(pipe.transformer, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    assert parameters
    info = {
        "run": run, "protocol": protocol,
        "lora": {"rank": rank, "alpha": alpha, "targets": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]},
        "base_model": {"model_source": "models/toy_sd3", "model_revision": None, "model_fingerprint": None},
        "recipe": {"iterations": iteration, "scaling": {"note": "hand-made test adapter"}},
        "checkpoint": {"policy": "last", "iteration": iteration}, "seed": seed, "provenance": {},
    }
    save_adapter(pipe.transformer, Path(folder), info)
    return Path(folder)
