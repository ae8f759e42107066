"""MAGNET adapters for tests, before a trained one exists: made by hand (the contract's recipe: the toy model's
transformer with a fresh LoRA whose B matrices are perturbed, since peft's Gaussian init leaves B = 0), or, for dry
runs, a stand-in rule that writes the adapter folder where the trainer's rule magnet_train is not there yet."""

from __future__ import annotations

from pathlib import Path

TOY_MODEL = Path(__file__).resolve().parents[1] / "models" / "toy_sd3"
_STAND_IN = """

rule adapter_stand_in:
    output:
        directory("results/magnet/{run}/adapter"),
    shell:
        "mkdir -p {output}"
"""


def make_toy_adapter(folder: Path, *, run: str = "toy_sd3_coco", protocol: str = "coco", seed: int = 0,
                     rank: int = 16, alpha: int = 16, scale: float = 0.05, iteration: int = 7) -> Path:
    """Write an adapter folder for the committed toy model: A from peft's Gaussian init, B ~ scale · N(0, 1)."""
    import torch

    from seg4diff_repro.magnet.lora import LORA_TARGETS, add_lora, save_adapter
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(TOY_MODEL)
    torch.manual_seed(seed)
    add_lora(pipe.transformer, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    info = {
        "run": run, "protocol": protocol, "lora": {"rank": rank, "alpha": alpha, "targets": list(LORA_TARGETS)},
        "base_model": {"model_source": "models/toy_sd3", "model_revision": None, "model_fingerprint": None},
        "recipe": {"iterations": iteration, "scaling": {"note": "hand-made test adapter"}},
        "checkpoint": {"policy": "last", "iteration": iteration}, "seed": seed, "provenance": {},
    }
    save_adapter(pipe.transformer, Path(folder), info)
    return Path(folder)


def plan_adapters(workdir: Path) -> None:
    """Let a dry run in ``workdir`` plan the adapter folders: the trainer's rule, or a stand-in before it exists."""
    rules = "".join(path.read_text() for path in (workdir / "workflow/rules").glob("*.smk"))
    if "rule magnet_train:" not in rules:
        (workdir / "Snakefile").write_text((workdir / "Snakefile").read_text() + _STAND_IN)
