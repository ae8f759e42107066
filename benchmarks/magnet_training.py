"""MAGNET training at SD3-medium size on one GPU: step time, peak memory, the largest per-GPU batch, and the
projected wall time of the paper's runs (COCO 3000 iterations, SA-1B 1000).

Random weights at the released configuration (speed and memory do not depend on the weights), fp16 weights
with fp16 autocast and a loss scaler as the official trainer, 1024² inputs, the official recipe (LoRA rank 16 on
every joint block's image-stream projections, the conv head, layer 9, focal + dice + flow matching). The
training images are synthetic (random pixels, random rectangular masks, a prompt of class names): the cost of a
step does not depend on their content. Each step includes the VAE encoding and the text encoders, as in the
official trainer. Prints a Markdown table and writes the raw numbers as JSON.

    python benchmarks/magnet_training.py --batch-sizes 1 2 4 8 --steps 6 --out magnet_training.json

``--model models/toy_sd3 --device cpu`` runs the same measurement on a saved pipeline (a check of the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from seg4diff_repro.magnet.data import MaskExample
from seg4diff_repro.magnet.train import MagnetRecipe, MagnetTrainer
from seg4diff_repro.models.released import build_released_random_pipeline
from seg4diff_repro.models.sd3 import SD3Adapter

CLASS_NAMES = ["person", "dog", "grass", "sky", "car", "tree", "road", "building"]
# The paper's runs (docs/method.md#magnet): iterations and the images of one iteration over the official 2 GPUs.
PAPER_RUNS = {"coco": {"iterations": 3000, "images_per_iteration": 8}, "sa1b": {"iterations": 1000, "images_per_iteration": 4}}


class SyntheticMasks:
    """Random images with ``n_masks`` random rectangles; COCO-protocol examples name a class per mask."""

    def __init__(self, protocol: str, size: int, n_masks: int, n: int = 64):
        self.protocol, self.size, self.n_masks, self.n = protocol, size, n_masks, n

    def __len__(self) -> int:
        return self.n

    def example(self, index: int, generator: torch.Generator) -> MaskExample:
        image = torch.rand(3, self.size, self.size, generator=generator)
        masks = torch.zeros(self.n_masks, self.size, self.size)
        for mask in masks:
            top, left = torch.randint(0, self.size // 2, (2,), generator=generator).tolist()
            mask[top: top + self.size // 3, left: left + self.size // 3] = 1
        names = CLASS_NAMES[: self.n_masks]
        if self.protocol == "coco":
            return MaskExample(image=image, prompt=" ".join(names), masks=masks, class_names=names)
        return MaskExample(image=image, prompt="A photo of a street. Cars and trees.", masks=masks, class_names=None)


def measure(adapter, protocol: str, batch_size: int, steps: int, warmup: int, layer: int) -> dict:
    """Seconds per optimiser step (median of ``steps`` after ``warmup``) and the peak memory of the run."""
    recipe = MagnetRecipe(protocol=protocol, layer=layer, iterations=warmup + steps, batch_size=batch_size,
                          warmup_iterations=1, checkpoint_every=10_000)
    n_masks = 6 if protocol == "coco" else 32
    training_set = SyntheticMasks(protocol, adapter.image_size, n_masks)
    cuda = adapter.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        trainer = MagnetTrainer(adapter, recipe, training_set, Path(folder))
        times = []
        try:
            for step in range(warmup + steps):
                synchronize()
                start = time.perf_counter()
                record = trainer.step()
                synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
        finally:
            _remove_lora(adapter.transformer)
            del trainer
            gc.collect()
    times.sort()
    return {"protocol": protocol, "batch_size": batch_size, "step_s": times[len(times) // 2],
            "step_s_all": times, "images_per_s": batch_size / times[len(times) // 2],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": record["loss"]}


def _remove_lora(transformer) -> None:
    """Take the LoRA layers off again, so that the next measurement starts from the plain transformer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent_name), child, module.get_base_layer())
    transformer.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--protocols", nargs="+", default=["coco", "sa1b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a saved pipeline instead of SD3-medium's random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layer", type=int, default=9)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # the official trainer's TF32 matmuls
    if args.model is None:
        adapter = SD3Adapter(build_released_random_pipeline("sd3", dtype=torch.float16, device=args.device), args.device)
    else:
        adapter = SD3Adapter.from_pretrained(args.model, device=args.device)
    rows, largest = [], {}
    for protocol in args.protocols:
        for batch_size in args.batch_sizes:
            try:
                row = measure(adapter, protocol, batch_size, args.steps, args.warmup, args.layer)
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                print(f"{protocol} batch {batch_size}: out of memory", flush=True)
                break
            rows.append(row)
            largest[protocol] = batch_size
            print(f"{protocol} batch {batch_size}: {row['step_s']:.3f} s/step, peak {row['peak_gib']} GiB", flush=True)
            args.out.write_text(json.dumps({"rows": rows, "largest_batch": largest}, indent=2))  # kept if cut short
    projections = {}
    for protocol, paper in PAPER_RUNS.items():
        measured = {row["batch_size"]: row for row in rows if row["protocol"] == protocol}
        if not measured:
            continue
        # The paper's images per iteration on one GPU: the smallest measured batch that holds them, accumulated.
        best = max(measured.values(), key=lambda row: row["images_per_s"])
        one_gpu_s = paper["iterations"] * paper["images_per_iteration"] / best["images_per_s"]
        per_gpu = paper["images_per_iteration"] // 2
        two_gpu_s = paper["iterations"] * measured[per_gpu]["step_s"] if per_gpu in measured else None
        projections[protocol] = {**paper, "one_h200_hours": one_gpu_s / 3600,
                                 "at_batch": best["batch_size"],
                                 "two_h200_ideal_hours": None if two_gpu_s is None else two_gpu_s / 3600}
    result = {"device": torch.cuda.get_device_name() if adapter.device.type == "cuda" else "cpu", "torch": torch.__version__, "rows": rows,
              "largest_batch": largest, "projections": projections}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nMAGNET training at SD3-medium size on {result['device']} (fp16, 1024², layer 9)\n")
    print("| protocol | batch | s/step | images/s | peak GiB |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['protocol']} | {row['batch_size']} | {row['step_s']:.3f} | {row['images_per_s']:.2f} "
              f"| {row['peak_gib'] or 0:.1f} |")
    print("\n| run | iterations × images | one H200 (h) | two H200, per-GPU batch as official, ideal (h) |\n|---|---|---|---|")
    for protocol, p in projections.items():
        two = "—" if p["two_h200_ideal_hours"] is None else f"{p['two_h200_ideal_hours']:.2f}"
        print(f"| {protocol} | {p['iterations']} × {p['images_per_iteration']} | {p['one_h200_hours']:.2f} "
              f"(batch {p['at_batch']}) | {two} |")


if __name__ == "__main__":
    main()
