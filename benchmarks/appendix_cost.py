"""The bill of the paper run: per-job rates measured on the GPU at real size x the paper config's own job list.

Two steps:

    python benchmarks/appendix_cost.py measure --models rehearsal/models --out rates.json   # on the GPU
    python benchmarks/appendix_cost.py bill --rates rates.json [--rehearsal-benchmarks results/benchmarks]

``measure`` loads the random-weight pipelines at the released configurations (`configs/rehearsal.yaml`'s
models, written by `benchmarks/rehearsal_setup.py`) and times, per model: loading, the transformer forward alone
at the extraction batch size, the extraction stage end to end per image (t = 8, all layers), the 28-step sweep
per image (one job: VAE and text encoders once), the unsupervised cache (empty prompt, one layer), Fig. 4's
per-head scoring, and generation per image (CFG for SD3/SD3.5, distilled guidance for Flux, the model's steps);
and the bytes each cache takes per image.

``bill`` asks Snakemake for the paper config's job list (``snakemake -n --forceall --configfile config.yaml
configs/paper.yaml``; every job with its wildcards), the image count of each dataset (the published counts in
`seg4diff_repro.datasets.sources`) and the prompt count of each generation run, multiplies, and prints GPU-hours
and disk per target group and in total. Jobs of rules without a per-image rate take the time their rule took in
the rehearsal (its Snakemake benchmark TSVs), which ran the same rules at real size.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANT_MODELS = {"sd3": "sd3_medium_random", "sd35": "sd35_medium_random", "flux": "flux_dev_random"}
# The paper models and the MAGNET variants of SD3-medium (its weights with a LoRA: the same cost per image).
PAPER_MODELS = {"sd3_medium": "sd3", "sd35_medium": "sd35", "flux_dev": "flux",
                "sd3_medium_magnet_coco": "sd3", "sd3_medium_magnet_sa1b": "sd3"}
# The paper's CLIPScore sets (main Table 3), for pricing when the prompt files are not there: prompts x seeds.
CLIPSCORE_SET_SIZES = {"pickapic": 500 * 5, "coco": 5000, "sa1b": 1000}
MAGNET_MEASUREMENT = Path(__file__).parent / "results/magnet_h200/magnet_training.json"
STEPS = {"sd3": 28, "sd35": 28, "flux": 50}  # config.yaml's num_inference_steps of the paper models
ANALYSIS_LAYER = {"sd3": 9, "sd35": 9, "flux": 12}
DTYPE = "float16"  # config.yaml's dtype of the paper models


# --------------------------------------------------------------------------------------------------------------
# measure (GPU)
# --------------------------------------------------------------------------------------------------------------


def _cuda_seconds(function) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _settings(variant: str, source: Path, **changes):
    from seg4diff_repro.attention.extract import ExtractionSettings

    values = dict(
        model=VARIANT_MODELS[variant], dataset="bench", backbone="flux" if variant == "flux" else "sd3",
        source=str(source), dtype=DTYPE, timestep=8, num_steps=STEPS[variant], layers=None, seed=0, short_side=640,
        resize="stretch", prompt="oracle", background_name="background", split="val", background="drop",
        limit=None, model_options={"mu_from_channels": True, "scale_to_unit_range": False, "guidance_scale": 3.5}
        if variant == "flux" else {},
    )
    return ExtractionSettings.from_dict(values | changes)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.npz"))


def _plain_forward_seconds(adapter, batch: int, noising, rounds: int = 6) -> float:
    """Median seconds of one transformer forward at ``batch`` (no recorder), inputs shaped as extraction's."""
    import torch

    side = adapter.image_size // adapter.pipe.vae_scale_factor
    channels = adapter.latent_channels if adapter.backbone == "flux" else adapter.transformer.config.in_channels
    latents = torch.randn(batch, channels, side, side, device=adapter.device, dtype=adapter.dtype)
    embeds, pooled = adapter.encode_prompts(["a photo of a cat and a dog"] * batch)
    for _ in range(2):
        adapter.forward(latents, noising, embeds, pooled)
    return statistics.median(_cuda_seconds(lambda: adapter.forward(latents, noising, embeds, pooled))
                             for _ in range(rounds))


def measure_model(variant: str, source: Path, dataset_root: Path, work: Path, images: int, sweep_images: int,
                  device: str = "cuda", only_extraction: bool = False) -> dict:
    import torch

    from seg4diff_repro.attention.extract import TimestepCache, auto_batch_size, extract_attention_timesteps
    from seg4diff_repro.models import load_adapter

    settings = _settings(variant, source)
    if device == "cpu":
        settings = _with(settings, dtype="float32")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if (source / "model_index.json").is_file():
        holder = {}
        load_s = _cuda_seconds(lambda: holder.update(adapter=load_adapter(
            settings.backbone, settings.source, settings.dtype, device, **dict(settings.model_options))))
        adapter = holder["adapter"]
    else:  # no folder: draw the released-size weights on the device (no disk); loading is timed by the rehearsal
        adapter, load_s = _built_adapter(variant, source, device), None
    noising = adapter.noising(8, STEPS[variant])
    layer = min(ANALYSIS_LAYER[variant], adapter.num_layers - 1)  # tiny models (a CPU check) have fewer
    batch = auto_batch_size(adapter, adapter.num_layers, noising, record=("i2t", "logits"))
    row: dict = {"variant": variant, "load_s": load_s, "batch": batch, "num_layers": adapter.num_layers}

    def run(name: str, caches: list, n: int) -> float:
        # Warm-up on 2 images (kernels, loader start), then the timed run over n images.
        warm = [TimestepCache(_with(c.settings, limit=2), work / f"{name}_warm" / c.out_dir.name) for c in caches]
        extract_attention_timesteps(warm, dataset_root, device=device, batch_size=batch, adapter=adapter)
        timed = [TimestepCache(_with(c.settings, limit=n), c.out_dir) for c in caches]
        return _cuda_seconds(lambda: extract_attention_timesteps(timed, dataset_root, device=device,
                                                                 batch_size=batch, adapter=adapter)) / n

    row["forward_s_per_image"] = _plain_forward_seconds(adapter, batch, noising) / batch
    row["extract_t8_s_per_image"] = run("t8", [TimestepCache(settings, work / variant / "t8")], images)
    row["extract_t8_bytes_per_image"] = _folder_bytes(work / variant / "t8") / images
    row["extract_layer_s_per_image"] = run(
        "layer", [TimestepCache(_with(settings, layers=(layer,)), work / variant / "layer")], images)
    if only_extraction:
        return _release(adapter, row)
    if variant != "flux":
        null = _with(settings, prompt="null", layers=(layer,), pad_multiple=32, background="class")
        row["unsupervised_s_per_image"] = run("null", [TimestepCache(null, work / variant / "null")], images)
        row["unsupervised_bytes_per_image"] = _folder_bytes(work / variant / "null") / images
        sweep = [TimestepCache(_with(settings, timestep=k, layers=None if k == 8 else (layer,)),
                               work / variant / "sweep" / f"t{k}") for k in range(1, STEPS[variant] + 1)]
        row["sweep_s_per_image"] = run("sweep", sweep, sweep_images)  # all 28 timesteps of one image
        row["sweep_bytes_per_image"] = _folder_bytes(work / variant / "sweep") / sweep_images
    if variant == "sd3":
        from seg4diff_repro.segmentation.heads import score_heads

        heads = _with(settings, background="class", limit=images)
        score_heads(_with(heads, limit=2), dataset_root, work / "heads_warm", device=device, batch_size=4,
                    adapter=adapter)
        row["score_heads_s_per_image"] = _cuda_seconds(lambda: score_heads(
            heads, dataset_root, work / "heads", device=device, batch_size=4, adapter=adapter)) / images
    row["generation_s_per_image"] = _generation_seconds(adapter.pipe, variant)
    return _release(adapter, row)


def _release(adapter, row: dict) -> dict:
    import torch

    row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del adapter
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _built_adapter(variant: str, source: Path, device: str):
    """The released-size random pipeline built on ``device``; ``source`` becomes a stub folder naming it, which
    the cache keys fingerprint in place of the weights."""
    import torch

    from seg4diff_repro.models.flux import FluxAdapter
    from seg4diff_repro.models.released import build_released_random_pipeline
    from seg4diff_repro.models.sd3 import SD3Adapter

    source.mkdir(parents=True, exist_ok=True)
    (source / "seg4diff_model.json").write_text(json.dumps({"kind": "released-random", "variant": variant,
                                                             "built_in_memory": True}))
    pipe = build_released_random_pipeline(variant, dtype=torch.float16, device=device)
    if variant == "flux":
        return FluxAdapter(pipe, device, mu_from_channels=True, scale_to_unit_range=False, guidance_scale=3.5)
    return SD3Adapter(pipe, device)


def _with(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


def _generation_seconds(pipe, variant: str, n: int = 4) -> float:
    """Seconds per image of a fidelity run (one perturbed layer, CFG 7.5 / Flux guidance), batch 4, 1024²."""
    from seg4diff_repro.generation.sampling import SamplingSettings, sample_images

    layer = min(ANALYSIS_LAYER[variant], len(pipe.transformer.transformer_blocks) - 1)
    settings = SamplingSettings(steps=STEPS[variant], cfg=7.5, perturb_layers=(layer,))
    prompts = ["a red bicycle leaning on a wall"] * n
    sample_images(pipe, prompts[:1], [0], SamplingSettings(steps=2, cfg=7.5), batch_size=1)  # warm-up
    return _cuda_seconds(lambda: sample_images(pipe, prompts, list(range(n)), settings, batch_size=4)) / n


def measure(args: argparse.Namespace) -> None:
    import torch

    from seg4diff_repro.datasets.toy_shapes import generate_toy_shapes

    work = Path(tempfile.mkdtemp(prefix="appendix-cost-"))
    dataset_root = work / "dataset"
    # 512x512 images with 1-3 objects each, like VOC's (prompt lengths of VOC's oracle prompts).
    generate_toy_shapes(dataset_root, n_train=1, n_val=max(args.images, args.sweep_images) + 2, image_size=512, seed=0)
    rows = []
    for variant in args.variants:
        source = Path(args.models) / VARIANT_MODELS[variant]
        print(f"measuring {variant} from {source}", file=sys.stderr, flush=True)
        rows.append(measure_model(variant, source, dataset_root, work, args.images, args.sweep_images, args.device,
                                  args.only_extraction))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        result = {"device": name, "torch": torch.__version__, "dtype": DTYPE,
                  "images": args.images, "sweep_images": args.sweep_images, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # after each model: a timeout keeps the rest
    _print_extraction_table(result)


def _print_extraction_table(result: dict) -> None:
    print(f"Device: {result['device']}; {result['dtype']}, 1024², random weights at the released configurations")
    print("| model | batch (auto) | forward alone, s/image | extraction t = 8 all layers, s/image | × forward "
          "| analysis layer only, s/image | × forward | sweep, 28 timesteps, s/image·timestep | × forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        forward = row["forward_s_per_image"]
        sweep = row.get("sweep_s_per_image")
        sweep_cells = (f"{sweep / STEPS[row['variant']]:.4f} | {sweep / STEPS[row['variant']] / forward:.2f}"
                       if sweep else "— | —")
        print(f"| {row['variant']} | {row['batch']} | {forward:.4f} | {row['extract_t8_s_per_image']:.4f} | "
              f"{row['extract_t8_s_per_image'] / forward:.2f} | {row['extract_layer_s_per_image']:.4f} | "
              f"{row['extract_layer_s_per_image'] / forward:.2f} | {sweep_cells} |")


# --------------------------------------------------------------------------------------------------------------
# bill (CPU)
# --------------------------------------------------------------------------------------------------------------

GROUPS = {
    "extract_attention": "segmentation: t = 8 caches",
    "extract_attention_sweep": "segmentation: Fig. 2 timestep sweep",
    "extract_unsupervised_attention": "segmentation: unsupervised caches",
    "score_heads": "segmentation: Fig. 4 per-head scoring",
    "generate_run": "generation: perturbation runs (Figs. 5, 7, 10, 18, 19)",
    "magnet_train": "MAGNET training (2 runs, one H200 each)",
    "value_norms": "generation: value norms (Figs. 6, 9, 15)",
    "pca_qkv_figure": "generation: PCA, token maps (Figs. 3, 12-14, 16, 17)",
    "token_maps_figure": "generation: PCA, token maps (Figs. 3, 12-14, 16, 17)",
}


def magnet_training_seconds(run: dict) -> float:
    """A MAGNET run's GPU time: its iterations x the step time measured on one H200 at SD3-medium size for the
    run's protocol and batch (benchmarks/magnet_training.py); data loading overlaps it in loader workers."""
    from seg4diff_repro.magnet.train import MagnetRecipe

    recipe = MagnetRecipe(protocol=run["protocol"], **run["recipe"])
    rows = json.loads(MAGNET_MEASUREMENT.read_text())["rows"]
    step = next(r["step_s"] for r in rows if r["protocol"] == recipe.protocol and r["batch_size"] == recipe.batch_size)
    return recipe.iterations * recipe.gradient_accumulation * step


def dry_run_jobs(config_files: list[str]) -> list[dict]:
    """Every job of the config's DAG (``--forceall``), as {rule, wildcards}, from Snakemake's own DAG.

    Built through Snakemake's API rather than read from a dry run's text: a rule with a ``message:`` prints the
    message instead of its rule name and wildcards there. The DAG object is internal to Snakemake (pinned in
    constraints/ci.txt), hence the private names."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            snakefile=REPO / "Snakefile", workdir=REPO, resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[REPO / name for name in config_files]),
        )
        workflow = workflow_api.dag(dag_settings=DAGSettings(forceall=True)).workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return [{"rule": job.rule.name, "wildcards": dict(job.wildcards)} for job in workflow.dag.jobs]


def _config(config_files: list[str]) -> dict:
    import yaml

    from seg4diff_repro.config import apply_defaults, load_schema

    merged: dict = {}
    for path in config_files:
        _merge(merged, yaml.safe_load((REPO / path).read_text()))
    return apply_defaults(merged, load_schema(REPO / "workflow/schemas/config.schema.yaml"))


def _merge(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


REHEARSAL_MODELS = {name: variant for variant, name in VARIANT_MODELS.items()}
# What each priced rule does per unit of work (images of its dataset, or generated images), by rate name.
PER_UNIT_RATE = {
    "extract_attention": "extract_t8_s_per_image",
    "extract_attention_sweep": "sweep_s_per_image",
    "extract_unsupervised_attention": "unsupervised_s_per_image",
    "score_heads": "score_heads_s_per_image",
    "generate_run": "generation_s_per_image",
    "value_norms": "generation_s_per_image",
}


def _rehearsal_jobs(folder: Path | None) -> list[dict]:
    """The rehearsal's jobs from its Snakemake benchmark TSVs: rule, model variant, wall seconds, file stem."""
    if folder is None or not folder.is_dir():
        return []
    jobs = []
    for tsv in folder.rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if len(lines) < 2:
            continue
        rule = tsv.relative_to(folder).parts[0]
        variant = next((v for name, v in REHEARSAL_MODELS.items() if tsv.stem.startswith(name)), None)
        jobs.append({"rule": rule, "variant": variant, "seconds": float(lines[1].split("\t")[0]), "stem": tsv.stem})
    return jobs


def _overheads(jobs: list[dict], rates: dict, units) -> dict:
    """Per-job fixed cost (start, imports, fingerprints, model load) = a rehearsal job's seconds minus its
    per-unit work at the measured rate; median per (rule, variant), per variant, and overall."""
    per_pair, per_variant = defaultdict(list), defaultdict(list)
    for job in jobs:
        rate_name = PER_UNIT_RATE.get(job["rule"])
        row = rates.get(job["variant"])
        if rate_name is None or row is None or rate_name not in row:
            continue
        fixed = max(0.0, job["seconds"] - units(job) * row[rate_name])
        per_pair[(job["rule"], job["variant"])].append(fixed)
        per_variant[job["variant"]].append(fixed)
    result = {key: statistics.median(values) for key, values in per_pair.items()}
    result |= {variant: statistics.median(values) for variant, values in per_variant.items()}
    return result


def bill(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets import sources
    from seg4diff_repro.generation.prompts import figure_prompts, load_prompts

    rates = json.loads(Path(args.rates).read_text())
    by_variant = {row["variant"]: row for row in rates["rows"]}
    config = _config(args.configfile)
    rehearsal_jobs = _rehearsal_jobs(Path(args.rehearsal_benchmarks) if args.rehearsal_benchmarks else None)
    rehearsal = {rule: statistics.median(j["seconds"] for j in rehearsal_jobs if j["rule"] == rule)
                 for rule in {j["rule"] for j in rehearsal_jobs}}

    def rehearsal_units(job: dict) -> float:
        if job["rule"] in ("generate_run", "value_norms"):
            match = re.search(r"_(fig18|fig19)_", job["stem"])
            return len(figure_prompts(match.group(1))) if match else args.rehearsal_prompts
        return args.rehearsal_images

    overhead = _overheads(rehearsal_jobs, by_variant, rehearsal_units)
    jobs = dry_run_jobs(args.configfile)

    def images(dataset: str) -> int:
        return sources.DATASETS[sources.resolve_name(config["datasets"][dataset]["prepared"])].expected_count

    generation = config["analyses"]["generation"]
    n_fidelity = len(load_prompts(generation["prompts_file"], generation["n_prompts"])) * len(generation["seeds"])
    n_value_norms = len(load_prompts(None, config["analyses"]["attention_figures"]["n_prompts"]))

    gpu_s, disk, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    unpriced = defaultdict(int)
    for job in jobs:
        rule, w = job["rule"], job["wildcards"]
        group = GROUPS.get(rule)
        if group is None:
            continue
        if rule == "generate_run" and w["prompt_set"].startswith("clipscore_"):
            group = "generation: main Table 3 CLIPScore sets (8,500 images per model)"
        elif rule == "generate_run" and w["prompt_set"] == "fig20":
            group = "generation: Fig. 20 (9 prompts per model)"
        variant = PAPER_MODELS.get(w.get("model", ""), "sd3")
        if rule == "value_norms" and "model" not in w:
            variant = "sd3"
        row = by_variant[variant]
        # Fixed cost per job: as the rehearsal measured it for this rule and model, else for this model.
        load = overhead.get((rule, variant), overhead.get(variant, row["load_s"] or 0.0))
        counts[group] += 1
        if rule == "extract_attention":
            n = images(w["dataset"])
            gpu_s[group] += load + n * row["extract_t8_s_per_image"]
            disk[group] += n * row["extract_t8_bytes_per_image"]
        elif rule == "extract_attention_sweep":
            n = images(w["dataset"])
            gpu_s[group] += load + n * row["sweep_s_per_image"]
            disk[group] += n * row["sweep_bytes_per_image"]
        elif rule == "extract_unsupervised_attention":
            n = images(w["dataset"])
            gpu_s[group] += load + n * row["unsupervised_s_per_image"]
            disk[group] += n * row["unsupervised_bytes_per_image"]
        elif rule == "score_heads":
            gpu_s[group] += load + images(w["dataset"]) * row["score_heads_s_per_image"]
        elif rule == "generate_run":
            prompt_set = w["prompt_set"]
            if prompt_set == "fidelity":
                prompts = n_fidelity
            elif prompt_set.startswith("clipscore_"):
                prompts = CLIPSCORE_SET_SIZES[prompt_set.removeprefix("clipscore_")]
            else:
                prompts = len(figure_prompts(prompt_set))
            branches = 1.5 if w["run"].startswith("guidance") else 1.0  # a third, perturbed branch per step
            gpu_s[group] += load + prompts * branches * row["generation_s_per_image"]
            disk[group] += prompts * 1.6e6  # a 1024² PNG
        elif rule == "value_norms":
            gpu_s[group] += load + n_value_norms * row["generation_s_per_image"]
        elif rule == "magnet_train":
            gpu_s[group] += magnet_training_seconds(config["magnet"]["runs"][w["run"]])
        elif rule in rehearsal or "pca_qkv_figure" in rehearsal:
            # A few fixed prompts: as long as in the rehearsal (token maps, where absent, as the PCA job).
            gpu_s[group] += rehearsal.get(rule, rehearsal.get("pca_qkv_figure"))
        else:
            unpriced[rule] += 1
    total_h = sum(gpu_s.values()) / 3600
    total_gb = sum(disk.values()) / 1e9
    print(f"Paper config ({' + '.join(args.configfile)}), rates measured on {rates['device']} "
          f"({rates['dtype']}, random weights at the released sizes); job list from Snakemake's DAG (--forceall).")
    print("| target group | jobs | GPU-hours | disk, GB |")
    print("|---|---:|---:|---:|")
    for group in dict.fromkeys([*GROUPS.values(), *counts]):
        if counts[group]:
            print(f"| {group} | {counts[group]} | {gpu_s[group] / 3600:.2f} | {disk[group] / 1e9:.1f} |")
    print(f"| **total** | {sum(counts.values())} | **{total_h:.2f}** | **{total_gb:.1f}** |")
    if unpriced:
        print(f"GPU jobs without a rate (not counted): {dict(unpriced)}")
    print("Per cached image: " + "; ".join(
        f"{v}: t = 8 all layers {r['extract_t8_bytes_per_image'] / 1e6:.2f} MB"
        + (f", sweep (28 timesteps) {r['sweep_bytes_per_image'] / 1e6:.2f} MB, unsupervised "
           f"{r['unsupervised_bytes_per_image'] / 1e6:.2f} MB" if "sweep_bytes_per_image" in r else "")
        for v, r in by_variant.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "groups": {g: {"jobs": counts[g], "gpu_hours": gpu_s[g] / 3600, "disk_gb": disk[g] / 1e9} for g in counts},
            "total_gpu_hours": total_h, "total_disk_gb": total_gb, "device": rates["device"],
        }, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("measure", help="per-job rates on the GPU at real size")
    command.add_argument("--models", required=True, help="folder of the rehearsal's pipelines")
    command.add_argument("--variants", nargs="+", default=["sd3", "sd35", "flux"])
    command.add_argument("--images", type=int, default=24)
    command.add_argument("--sweep-images", type=int, default=8)
    command.add_argument("--device", default="cuda")
    command.add_argument("--only-extraction", action="store_true",
                         help="forward alone and extraction at t = 8 (all layers, analysis layer) only")
    command.add_argument("--out", required=True)
    command.set_defaults(handler=measure)
    command = commands.add_parser("bill", help="the paper config's GPU-hours and disk from the measured rates")
    command.add_argument("--rates", required=True)
    command.add_argument("--configfile", nargs="+", default=["config.yaml", "configs/paper.yaml"])
    command.add_argument("--rehearsal-benchmarks", default=None, help="results/benchmarks of the rehearsal run")
    command.add_argument("--rehearsal-images", type=int, default=3, help="images per dataset in the rehearsal")
    command.add_argument("--rehearsal-prompts", type=int, default=1, help="fidelity prompts in the rehearsal")
    command.add_argument("--out", default=None)
    command.set_defaults(handler=bill)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
