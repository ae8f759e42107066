"""MAGNET's trainable parts: the LoRA on the image-stream attention projections, and the conv residual head.

The LoRA (docs/method.md#magnet) is rank 16, α 16, Gaussian-initialised, without dropout, on ``attn.to_q``,
``attn.to_k``, ``attn.to_v`` and ``attn.to_out.0`` of every joint block: the image stream only (the text stream's
``add_*`` projections and SD3.5's second attention ``attn2`` stay frozen). A trained adapter is a folder with the
peft state dict (``adapter.safetensors``) and ``adapter.json`` (the LoRA settings, the training recipe and where
the weights came from), which ``apply_lora`` puts on a loaded transformer for evaluation and generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_INFO = "adapter.json"
ADAPTER_NAME = "magnet"


def lora_config(rank: int = 16, alpha: int = 16):
    """The peft ``LoraConfig`` of MAGNET."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )


def add_lora(transformer: nn.Module, rank: int = 16, alpha: int = 16) -> list[nn.Parameter]:
    """Freeze ``transformer`` and give it a fresh (Gaussian-initialised) MAGNET LoRA; return the LoRA parameters,
    the only trainable ones. The initialisation draws from torch's global generator: seed it first."""
    from peft import inject_adapter_in_model

    transformer.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank, alpha), transformer, adapter_name=ADAPTER_NAME)
    parameters = [p for name, p in transformer.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``transformer`` (peft's names, without the adapter name), on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def load_lora_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors saved by ``lora_state_dict`` into ``transformer``'s adapter; every tensor must be used."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{len(unexpected)} LoRA tensors match no layer of this transformer (e.g. {unexpected[0]}): "
                         "the adapter was trained on another architecture")


def save_adapter(transformer: nn.Module, folder: Path, info: dict) -> None:
    """Write the adapter folder atomically: weights first, then ``adapter.json`` (its presence marks it complete)."""
    from safetensors.torch import save

    from seg4diff_repro.atomic import atomic_write_bytes, atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(lora_state_dict(transformer)))
    atomic_write_json(folder / ADAPTER_INFO, info)


def read_adapter_info(folder: str | Path) -> dict:
    """``adapter.json`` of an adapter folder, with an error that says what to do when it is not one."""
    folder = Path(folder)
    info_file, weights = folder / ADAPTER_INFO, folder / ADAPTER_WEIGHTS
    if not info_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} is not a MAGNET adapter folder (it needs {ADAPTER_WEIGHTS} and {ADAPTER_INFO}): point the "
            "model's `lora` at the folder a `magnet_train` job wrote (results/magnet/<run>/adapter)"
        )
    return json.loads(info_file.read_text())


def apply_lora(transformer: nn.Module, folder: str | Path) -> dict:
    """Put the trained adapter in ``folder`` on ``transformer`` (as the official evaluation does with
    ``USE_LORA``: the conv head is not used); return its ``adapter.json``."""
    from safetensors.torch import load_file

    info = read_adapter_info(folder)
    lora = info["lora"]
    add_lora(transformer, rank=lora["rank"], alpha=lora["alpha"])
    device = next(transformer.parameters()).device
    load_lora_state(transformer, load_file(str(Path(folder) / ADAPTER_WEIGHTS), device=str(device)))
    dtype = next(p for n, p in transformer.named_parameters() if "lora_" not in n).dtype
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(dtype)
    transformer.requires_grad_(False)
    return info


class AttentionScoreHead(nn.Module):
    """The official code's conv head ("attn_mlp"): Conv3×3(1→64)–ReLU–Conv3×3(64→64)–ReLU–Conv3×3(64→1), its
    output added to each token map as a residual. Trained with the LoRA, never used at evaluation."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps`` [..., h, w] → the same maps plus the head's residual."""
        flat = maps.reshape(-1, 1, *maps.shape[-2:])
        return maps + self.layers(flat).reshape(maps.shape)
