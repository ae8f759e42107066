"""`seg4diff-repro` command line: the entry points the Snakemake rules call.

Each subcommand does one stage; the rules pass paths and settings, and logs go to stderr, which the
rules redirect to `logs/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seg4diff_repro.cli_attention_figures import add_attention_figure_commands
from seg4diff_repro.cli_datasets import add_dataset_commands
from seg4diff_repro.cli_generation import add_generation_commands
from seg4diff_repro.cli_magnet import add_magnet_commands
from seg4diff_repro.cli_help import MAIN_EPILOG, HelpFormatter, finish_commands
from seg4diff_repro.cli_segmentation_appendix import add_segmentation_appendix_commands
from seg4diff_repro.cli_toy import add_toy_commands
from seg4diff_repro.cli_report import add_report_commands
from seg4diff_repro.cli_verify import add_verify_commands
from seg4diff_repro.progress import quiet_library_progress_bars


def _build_tiny_model(args: argparse.Namespace) -> None:
    if args.backbone == "flux":
        from seg4diff_repro.models.tiny_flux import write_tiny_flux_pipeline

        write_tiny_flux_pipeline(Path(args.out), seed=args.seed)
    else:
        from seg4diff_repro.config import tiny_sd3_config
        from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline

        write_tiny_sd3_pipeline(Path(args.out), config=tiny_sd3_config({"variant": args.variant}), seed=args.seed)


def _download_model(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.layout import atomic_write_json
    from seg4diff_repro.models import download_model

    atomic_write_json(Path(args.out), download_model(args.backbone, args.source, args.revision))


def _make_toy_shapes(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.toy_shapes import generate_toy_shapes

    generate_toy_shapes(
        Path(args.root), n_train=args.n_train, n_val=args.n_val, image_size=args.image_size, seed=args.seed
    )


# datasets.toy_world.PRESET_NAMES, spelled out so that building the parser imports no numpy (tests check they agree).
TOY_WORLD_PRESETS = ("objects", "crowd", "scenes", "stuff", "mixed")


def _make_toy_world(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.toy_world import generate_toy_world

    generate_toy_world(
        Path(args.root), preset=args.preset, n_train=args.n_train, n_val=args.n_val, image_size=args.image_size,
        seed=args.seed, workers=args.workers,
    )


def _extract_attention(args: argparse.Namespace) -> None:
    from seg4diff_repro.attention.extract import (
        ExtractionSettings, TimestepCache, extract_attention_timesteps, extract_shard, parse_shard,
    )
    from seg4diff_repro.datasets.layout import atomic_write_json

    spec = json.loads(args.settings)
    # --caches: several timesteps of the same images in one run (VAE and text encoders once per image).
    overrides = json.loads(args.caches) if args.caches else [{"out_dir": args.out_dir}]
    caches = [
        TimestepCache(ExtractionSettings.from_dict(spec | {k: v for k, v in each.items() if k != "out_dir"}),
                      Path(each["out_dir"]))
        for each in overrides
    ]
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    if args.shard_record is None:
        if args.shard != "1-of-1":
            raise SystemExit(f"--shard {args.shard}: give --shard-record (gather-attention joins the shards)")
        extract_attention_timesteps(caches, Path(args.dataset_root), device=args.device, batch_size=batch_size)
        return
    record = extract_shard(caches, Path(args.dataset_root), parse_shard(args.shard), device=args.device,
                           batch_size=batch_size)
    atomic_write_json(Path(args.shard_record), record)


def _gather_attention(args: argparse.Namespace) -> None:
    # Without torch: a gather job starts in a fraction of a second.
    from seg4diff_repro.attention.shards import gather_shards

    gather_shards([json.loads(Path(path).read_text()) for path in args.shards], Path(args.dataset_root))


def _shard_root(out: str) -> Path:
    """Where a scoring run keeps its finished shards: beside its output, so a re-run after a kill resumes."""
    return Path(out).with_suffix(".shards")


def _score_layers(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.layout import atomic_write_bytes
    from seg4diff_repro.segmentation.score import ScoringSettings, score_layers

    scores = score_layers(
        Path(args.cache), Path(args.dataset_root), ScoringSettings(**json.loads(args.settings)),
        _shard_root(args.out), args.shard_size,
    )
    atomic_write_bytes(Path(args.out), scores.to_csv(index=False).encode())


def _per_layer_table(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.tables.per_layer import write_per_layer_table

    write_per_layer_table(
        pd.read_csv(args.scores), _none_if_none(args.paper_model), _none_if_none(args.paper_dataset), args.csv,
        args.markdown,
    )


def _per_layer_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.per_layer import plot_per_layer

    plot_per_layer(pd.read_csv(args.table), Path(args.png), Path(args.pdf))


def _toy_world_summary(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.per_layer import plot_miou_by_model
    from seg4diff_repro.tables.toy_world import write_grounding_summary

    write_grounding_summary(args.trained, args.control, args.csv, args.markdown, args.unsupervised)
    plot_miou_by_model(
        [pd.read_csv(args.trained), pd.read_csv(args.control)], Path(args.png), Path(args.pdf),
        "Toy world: trained toy model vs random-weight control",
    )


def _none_if_none(name: str) -> str | None:
    return None if name == "none" else name


def _timestep_sweep(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.per_layer import plot_timestep_sweep
    from seg4diff_repro.tables.sweeps import timestep_sweep_table, write_table

    scores = [pd.read_csv(path) for path in args.scores]
    table = timestep_sweep_table(scores, args.layer, _none_if_none(args.paper_model), _none_if_none(args.paper_dataset))
    write_table(
        table, scores[0].iloc[0], f"Segmentation vs timestep: {table['model'][0]} on {table['dataset'][0]}, "
        f"layer {args.layer}", "Scores in percent for inputs noised to timesteps[-k]; `paper_mIoU` only where the "
        "paper gives a number (k = 8, main Table 1); the paper's curve (appendix Fig. 2) peaks at k = 8.",
        args.csv, args.markdown,
    )
    plot_timestep_sweep(table, Path(args.png), Path(args.pdf))


def _normalisation_table(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.tables.sweeps import normalisation_table, write_table

    variants = {}
    for path in args.scores:
        scores = pd.read_csv(path)
        first = scores.iloc[0]
        variants[(bool(first["softmax"]), bool(first["norm_before_merge"] or first["norm_after_merge"]))] = scores
    table = normalisation_table(variants, args.layer, _none_if_none(args.paper_model), _none_if_none(args.paper_dataset))
    write_table(
        table, first.drop(labels=["attention"]), f"Score normalisation (appendix Table 1): {table['model'][0]} on {table['dataset'][0]}, "
        f"layer {args.layer}", "mIoU etc. in percent. min_max = min-max per token before and per class after "
        "merging; `paper_mIoU` where the paper reports one (its row-to-setting pairing is inferred, "
        "docs/method.md#reported-numbers).",
        args.csv, args.markdown,
    )


def _score_unsupervised(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.layout import atomic_write_bytes
    from seg4diff_repro.segmentation.score import score_unsupervised

    scores = score_unsupervised(
        Path(args.cache), Path(args.dataset_root), _shard_root(args.out), args.kl_threshold, args.geometry,
        args.shard_size, args.matching, args.scored_classes,
    )
    atomic_write_bytes(Path(args.out), scores.to_csv(index=False).encode())


def _unsupervised_table(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.tables.sweeps import unsupervised_table, write_table

    scores = pd.read_csv(args.scores)
    table = unsupervised_table(scores, args.layer, _none_if_none(args.paper_model), _none_if_none(args.paper_dataset))
    write_table(
        table, scores.iloc[0], f"Unsupervised segmentation: {table['model'][0]} on {table['dataset'][0]}, "
        f"layer {args.layer}", "Empty prompt, the 77 token maps min-max normalised per pixel, spatial softmax, "
        "one greedy symmetric-KL merging pass, argmax; Hungarian matching (unmatched proposals count as false "
        "negatives), mIoU = nanmean over classes (docs/method.md#unsupervised-protocol). The official trainer matches each image ROW on "
        "its own (its `hungarian_matching` loops over the first axis of one [H, W] map): a bug, but the protocol of "
        "the paper's Table 2; both are shown, `mIoU` is the `matching` the config chose. `background`: class = scored "
        "as a class (the paper includes it for VOC, PC59 and Object); `scored_classes`: the official N_CLASS, labels "
        "from it on dropped. `geometry` official: input zero-padded to a "
        "multiple of 32, scored at the 640-short-side resized ground truth with the official top-left-crop quirk for "
        "larger images (Cityscapes); aligned: no padding, scored at the original resolution. `paper_mIoU`: main "
        "Table 2 where it has the model and dataset.",
        args.csv, args.markdown,
    )


def _add_paper_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--paper-model", default="none", help="row of the paper's tables, or none")
    command.add_argument("--paper-dataset", default="none", help="column of the paper's tables, or none")


def _add_outputs(command: argparse.ArgumentParser, *, table: bool, figure: bool) -> None:
    """The output files of a table (CSV + Markdown) and/or a figure (PNG + PDF)."""
    for flag in (("--csv", "--markdown") if table else ()) + (("--png", "--pdf") if figure else ()):
        command.add_argument(flag, required=True)


def build_parser() -> argparse.ArgumentParser:
    from seg4diff_repro import __version__

    parser = argparse.ArgumentParser(
        prog="seg4diff-repro", description=__doc__.splitlines()[0], epilog=MAIN_EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    command = commands.add_parser("build-tiny-model", help="write a tiny random-weight pipeline of the real classes")
    command.add_argument("--backbone", choices=["sd3", "flux"], default="sd3", help="model family of the pipeline")
    command.add_argument("--variant", choices=["sd3", "sd35", "toy_world"], default="sd3",
                         help="sd3 backbone: SD3 or SD3.5 blocks at the tests' tiny size, or the toy world's model size")
    command.add_argument("--out", required=True, help="folder to write the pipeline to (save_pretrained layout)")
    command.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    command.set_defaults(handler=_build_tiny_model)

    command = commands.add_parser("download-model", help="fetch a Hugging Face model into the local hub cache")
    command.add_argument("--backbone", choices=["sd3", "flux"], required=True,
                         help="sd3 (SD3, SD3.5: its T5 is not fetched) or flux")
    command.add_argument("--source", required=True, help="Hugging Face id, e.g. stabilityai/stable-diffusion-3-medium-diffusers")
    command.add_argument("--revision", default=None, help="hub commit (models.<name>.revision); none: the newest")
    command.add_argument("--out", required=True, help="JSON record of the download (snapshot folder, commit, size)")
    command.set_defaults(handler=_download_model)

    command = commands.add_parser("make-toy-shapes", help="generate the toy-shapes dataset (VOC layout)")
    command.add_argument("--root", required=True, help="dataset folder to write (images, labels, splits, classes.json)")
    command.add_argument("--n-train", type=int, default=512, help="images in the train split")
    command.add_argument("--n-val", type=int, default=64, help="images in the val split")
    command.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    command.add_argument("--seed", type=int, default=0, help="seed of the generator (the dataset is a function of it)")
    command.set_defaults(handler=_make_toy_shapes)

    command = commands.add_parser(
        "make-toy-world", help="generate a preset of the harder toy world (VOC layout; the default run's datasets)"
    )
    command.add_argument("--root", required=True, help="dataset folder to write (images, labels, splits, classes.json)")
    command.add_argument("--preset", required=True, choices=list(TOY_WORLD_PRESETS),
                         help="objects (VOC), crowd (COCO-Object), scenes (ADE20K, Pascal Context), stuff (COCO-Stuff), "
                              "or mixed (each image one of the four: the toy model's training set)")
    command.add_argument("--n-train", type=int, default=512, help="images in the train split")
    command.add_argument("--n-val", type=int, default=64, help="images in the val split")
    command.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    command.add_argument("--seed", type=int, default=0, help="seed of the generator (the dataset is a function of it)")
    command.add_argument("--workers", type=int, default=1,
                         help="processes drawing the images (the dataset does not depend on it)")
    command.set_defaults(handler=_make_toy_world)

    command = commands.add_parser("extract-attention", help="cache I2T attention maps of a dataset split")
    command.add_argument("--settings", required=True, help="JSON of ExtractionSettings")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--out-dir", help="cache folder of one timestep: one file per image and manifest.json")
    command.add_argument(
        "--caches", help='JSON list of {"timestep", "layers", "out_dir"}: several timesteps of the same images at once'
    )
    command.add_argument("--shard", default="1-of-1", help="<i>-of-<n>: the i-th of n contiguous runs of images")
    command.add_argument("--shard-record", default=None,
                         help="write the shard's record here (for gather-attention) instead of the caches' manifests")
    command.add_argument("--device", default="cpu", help="cpu, cuda (a free GPU of this host), cuda:N")
    command.add_argument("--batch-size", default="8", help="images per forward pass, or auto (the largest that fits)")
    command.set_defaults(handler=_extract_attention)

    command = commands.add_parser("gather-attention",
                                  help="check the shards of attention caches, write each cache's manifest.json")
    command.add_argument("--shards", nargs="+", required=True, help="shard records written by extract-attention")
    command.add_argument("--dataset-root", required=True)
    command.set_defaults(handler=_gather_attention)

    command = commands.add_parser("score-layers", help="per-layer segmentation scores from the cache")
    command.add_argument("--cache", required=True, help="manifest.json of the attention cache")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--settings", required=True, help="JSON of ScoringSettings")
    command.add_argument("--out", required=True, help="CSV; finished shards are kept in <out without .csv>.shards/")
    command.add_argument("--shard-size", type=int, default=64, help="images per resumable shard")
    command.set_defaults(handler=_score_layers)

    command = commands.add_parser("per-layer-table", help="paper_tables/ per-layer table (CSV + Markdown)")
    command.add_argument("--scores", required=True, help="per-layer score CSV of score-layers")
    _add_paper_arguments(command)
    _add_outputs(command, table=True, figure=False)
    command.set_defaults(handler=_per_layer_table)

    command = commands.add_parser("per-layer-figure", help="figures/ per-layer curves (PNG + PDF)")
    command.add_argument("--table", required=True, help="per-layer table CSV of per-layer-table")
    _add_outputs(command, table=False, figure=True)
    command.set_defaults(handler=_per_layer_figure)

    command = commands.add_parser("toy-world-summary", help="trained toy model vs its random control (table + figure)")
    command.add_argument("--trained", required=True, help="per-layer table (CSV) of the trained toy model")
    command.add_argument("--control", required=True, help="per-layer table (CSV) of the random-weight control")
    command.add_argument("--unsupervised", default=None,
                         help="unsupervised scores (CSV) of the trained toy model: checks its proposals per image")
    _add_outputs(command, table=True, figure=True)
    command.set_defaults(handler=_toy_world_summary)

    command = commands.add_parser("timestep-sweep", help="segmentation vs timestep at one layer (table + figure)")
    command.add_argument("--scores", nargs="+", required=True, help="per-layer score CSVs, one per timestep")
    command.add_argument("--layer", type=int, required=True)
    _add_paper_arguments(command)
    _add_outputs(command, table=True, figure=True)
    command.set_defaults(handler=_timestep_sweep)

    command = commands.add_parser("normalisation-table", help="appendix Table 1: the four scorings side by side")
    command.add_argument("--scores", nargs=4, required=True, help="per-layer score CSVs of the four variants")
    command.add_argument("--layer", type=int, required=True)
    _add_paper_arguments(command)
    _add_outputs(command, table=True, figure=False)
    command.set_defaults(handler=_normalisation_table)

    command = commands.add_parser("score-unsupervised", help="unsupervised segmentation scores from an empty-prompt cache")
    command.add_argument("--cache", required=True, help="manifest.json of an attention cache extracted with prompt 'null'")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--kl-threshold", type=float, default=0.1)
    command.add_argument("--geometry", choices=["official", "aligned"], default="official",
                         help="official: padded input, scored at the 640-short-side label with the crop quirk")
    command.add_argument("--matching", choices=["per_row", "per_image"], default="per_row",
                         help="the headline mIoU: per_row (the official trainer's) or per_image; both are scored")
    command.add_argument("--scored-classes", type=lambda v: None if v == "none" else int(v), default=None,
                         help="the official N_CLASS where it differs from the dataset view's class count, or none")
    command.add_argument("--out", required=True, help="CSV; finished shards are kept in <out without .csv>.shards/")
    command.add_argument("--shard-size", type=int, default=64, help="images per resumable shard")
    command.set_defaults(handler=_score_unsupervised)

    command = commands.add_parser("unsupervised-table", help="unsupervised scores beside the paper's Table 2")
    command.add_argument("--scores", required=True, help="score CSV of score-unsupervised")
    command.add_argument("--layer", type=int, required=True)
    _add_paper_arguments(command)
    _add_outputs(command, table=True, figure=False)
    command.set_defaults(handler=_unsupervised_table)

    add_dataset_commands(commands)
    add_toy_commands(commands)
    add_magnet_commands(commands)
    add_report_commands(commands)
    add_generation_commands(commands)
    add_attention_figure_commands(commands)
    add_segmentation_appendix_commands(commands)
    add_verify_commands(commands)
    finish_commands(parser, commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The `seg4diff-repro` command: in the workflow's warm fork server where one runs (fork_server.py), else here."""
    if argv is None:
        from seg4diff_repro.fork_server import run_job

        run_job(sys.argv[1:])
    else:
        run_command(argv)


def run_command(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the process's arguments) and run the subcommand in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    quiet_library_progress_bars()  # in a job's log: no loading and download bars of diffusers, transformers, hub
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None):
        from seg4diff_repro.gpu_slots import claim_gpu

        # Before any torch import: a GPU command takes a free GPU of this host for itself (gpu_slots.py).
        args.device = claim_gpu(args.device)
    args.handler(args)


if __name__ == "__main__":
    main()
