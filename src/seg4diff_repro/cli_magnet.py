"""MAGNET subcommand of `seg4diff-repro`: ``magnet-train`` trains one configured run's LoRA and writes its adapter."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)


def training_set(data: dict, image_size: int, seed: int):
    """The examples of a run's ``data`` settings: a prepared set with label maps (COCO protocol data) or
    prepared SA-1B masks, at the model's input size with the official sizes scaled to it."""
    from seg4diff_repro.magnet.data import CocoProtocolMaskDataset, Sa1bMaskDataset

    if data["format"] == "sa1b":
        return Sa1bMaskDataset(data["root"], split=data["split"], image_size=image_size, seed=seed,
                               limit=data["limit"])
    return CocoProtocolMaskDataset(data["root"], split=data["split"], image_size=image_size, seed=seed,
                                   coco_crop=data["coco_crop"], prompt=data["prompt"],
                                   background=data["background"], limit=data["limit"])


def _magnet_train(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_text
    from seg4diff_repro.magnet.train import MagnetRecipe, MagnetTrainer
    from seg4diff_repro.models import load_adapter
    from seg4diff_repro.models.common import model_record
    from seg4diff_repro.provenance import code_fingerprint, provenance

    settings = json.loads(args.settings)
    model, recipe = settings["model"], MagnetRecipe(**settings["recipe"])
    adapter = load_adapter(model["backbone"], model["source"], model["dtype"], args.device, model["revision"])
    if adapter.backbone != "sd3":
        raise ValueError(f"MAGNET run {settings['run']}: model {model['name']} is a {adapter.backbone} model; "
                         "MAGNET trains SD3-architecture models (backbone: sd3)")
    if not 0 <= recipe.layer < adapter.num_layers:
        raise ValueError(f"MAGNET run {settings['run']}: layer {recipe.layer} does not exist in {model['name']} "
                         f"(joint layers 0..{adapter.num_layers - 1}); set magnet.runs.{settings['run']}.recipe.layer")
    examples = training_set(settings["data"], adapter.image_size, recipe.seed)
    run_dir = Path(args.run_dir)
    # As the extraction's loader: workers on a GPU host (SEG4DIFF_LOADER_WORKERS overrides), none on a CPU.
    default_workers = min(4, len(os.sched_getaffinity(0)) - 1) if adapter.device.type == "cuda" else 0
    workers = int(os.environ.get("SEG4DIFF_LOADER_WORKERS", default_workers))
    trainer = MagnetTrainer(adapter, recipe, examples, run_dir, code=code_fingerprint("magnet"),
                            loader_workers=max(0, workers))
    evaluate = None
    if settings.get("validation"):
        from seg4diff_repro.attention.extract import ExtractionSettings
        from seg4diff_repro.magnet.validate import supervised_layer_miou

        validation = settings["validation"]
        extraction = ExtractionSettings.from_dict(validation["settings"])

        def evaluate() -> float:
            return supervised_layer_miou(adapter, Path(validation["root"]), extraction, recipe.layer)

    chosen = trainer.train(evaluate)
    LOG.info("MAGNET run %s: %d iterations; keeping iteration %d (%s)", settings["run"], recipe.iterations,
             chosen["iteration"], chosen["policy"])
    adapter_dir = Path(args.adapter)
    trainer.write_adapter(adapter_dir, chosen, {
        "run": settings["run"],
        "base_model": {"name": model["name"], **model_record(model["source"], model["revision"])},
        "data": examples.record(),
        "validation": settings.get("validation"),
        "device": str(adapter.device),
        "gradient_accumulation_note": (
            "the official trainer stores GRADIENT_ACCUMULATION_STEPS 2 but never accumulates: 1 reproduces what "
            "ran, 2 the paper's effective batch"),
        "provenance": provenance("magnet"),
    })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(trainer.history[0]))
    writer.writeheader()
    writer.writerows(trainer.history)
    atomic_write_text(adapter_dir / "train_log.csv", buffer.getvalue())


def add_magnet_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `magnet-train` on an argparse subparsers object."""
    command = subparsers.add_parser(
        "magnet-train", help="train a MAGNET LoRA (mask-aligned expert-layer attention) and write its adapter folder"
    )
    command.add_argument("--settings", required=True, help="JSON: the run, its base model, data and recipe")
    command.add_argument("--run-dir", required=True, help="folder of the run's checkpoints (resumed from)")
    command.add_argument("--adapter", required=True, help="adapter folder to write (adapter.safetensors, adapter.json)")
    command.add_argument("--device", default="cpu")
    command.set_defaults(handler=_magnet_train)
