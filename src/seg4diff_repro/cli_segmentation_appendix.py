"""Subcommands of `seg4diff-repro` for the appendix's segmentation targets (figures/figNN_*, paper_tables/).

``add_segmentation_appendix_commands(subparsers)`` registers them on the main parser. Titles come from
the rules, which know which configured model and dataset stand in for the paper's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _outputs(command: argparse.ArgumentParser, *, table: bool, figure: bool) -> None:
    command.add_argument("--title", required=True, help="figure/table title (names the paper's figure and stand-ins)")
    for flag in (("--csv", "--markdown") if table else ()) + (("--png", "--pdf") if figure else ()):
        command.add_argument(flag, required=True)


def _score_heads(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.attention.extract import ExtractionSettings
    from seg4diff_repro.segmentation.heads import score_heads

    out = Path(args.out)
    scores = score_heads(
        ExtractionSettings.from_dict(json.loads(args.settings)), Path(args.dataset_root), out.with_suffix(".shards"),
        device=args.device, batch_size=args.batch_size, shard_size=args.shard_size,
    )
    atomic_write_bytes(out, scores.to_csv(index=False).encode())


def _head_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.segmentation_appendix import plot_head_heatmap
    from seg4diff_repro.tables.segmentation_appendix import head_table
    from seg4diff_repro.tables.sweeps import write_table

    scores = pd.read_csv(args.scores)
    title = f"{args.title}, {_segmentation_step(scores.iloc[0])}"
    write_table(
        head_table(scores), scores.iloc[0], title,
        "mIoU (%) of the post-softmax I2T map of each single head, background as a prompt class, accumulated as one "
        "confusion matrix per (layer, head) while streaming. The paper reports this figure only as a plot.",
        args.csv, args.markdown,
    )
    plot_head_heatmap(scores, title, args.png, args.pdf)


def _panel_provenances(args: argparse.Namespace) -> list:
    """The settings row of each panel's raw score CSV (``--provenance``, one per ``--tables``)."""
    import pandas as pd

    if not len(args.provenance) == len(args.tables) == len(args.labels):
        raise SystemExit(
            f"--tables ({len(args.tables)}), --labels ({len(args.labels)}) and --provenance ({len(args.provenance)}) "
            "must name one file or label per panel, in the same order"
        )
    return [pd.read_csv(path).iloc[0] for path in args.provenance]


def _timestep_panels(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.segmentation_appendix import plot_timestep_panels
    from seg4diff_repro.tables.sweeps import write_panel_table

    provenances = _panel_provenances(args)
    tables = [pd.read_csv(path) for path in args.tables]
    write_panel_table(
        [(label, table.assign(diff_mIoU=table["mIoU"] - table["paper_mIoU"].astype(float)), provenance)
         for label, table, provenance in zip(args.labels, tables, provenances)],
        args.title,
        "One row per (panel, k). `paper_mIoU` where the paper gives a number (k = 8, its Table 1 value); the paper's "
        "best k is 8 on both datasets.", args.csv, args.markdown,
    )
    plot_timestep_panels(list(zip(args.labels, tables)), args.title, args.png, args.pdf)


def _normalisation_panels(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.tables.sweeps import write_panel_table

    # The rows differ in softmax and min-max (their own columns): the settings keep only what they share.
    provenances = [provenance.drop(labels=["attention"], errors="ignore") for provenance in _panel_provenances(args)]
    write_panel_table(
        [(label, pd.read_csv(path), provenance)
         for label, path, provenance in zip(args.labels, args.tables, provenances)],
        args.title,
        "Head-mean I2T maps, post-softmax (`post_softmax` True) or the pre-softmax logits (False), raw or min-max "
        "normalised (`min_max`: before and after merging a class's tokens), as each row says. The paper's "
        "checkmarks are lost in every copy; its row-to-setting pairing is inferred (docs/method.md#reported-numbers).",
        args.csv, args.markdown,
    )


def _appendix_per_layer(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.per_layer import plot_per_layer
    from seg4diff_repro.tables.per_layer import per_layer_table
    from seg4diff_repro.tables.sweeps import write_table

    scores = pd.read_csv(args.scores)
    table = per_layer_table(scores, args.paper_model, args.paper_dataset)
    title = f"{args.title}, {_segmentation_step(scores.iloc[0])}"
    first_single = None
    note = "Scores in percent per joint layer; `paper_mIoU` on the layer the paper evaluates, where it reports one."
    if args.backbone == "flux":
        from seg4diff_repro.models.flux import flux_double_stream_blocks

        first_single = flux_double_stream_blocks(args.model_source)
        note += (f" Layers 0–{first_single - 1} are double-stream (MM-DiT) blocks, layers {first_single} on "
                 "single-stream blocks.")
    write_table(table, scores.iloc[0], title, note, args.csv, args.markdown)
    plot_per_layer(table, Path(args.png), Path(args.pdf), title=title, first_single=first_single)


def _segmentation_step(scores_row) -> str:
    """The step label of a segmentation score row: its input was noised to timesteps[-k] (index N − k)."""
    from seg4diff_repro.figures import step_label

    k, num_steps = int(scores_row["timestep_k"]), int(scores_row["num_steps"])
    return step_label(k, num_steps, num_steps - k, float(scores_row["sigma"]))


def _overlays(args: argparse.Namespace) -> None:
    from seg4diff_repro.attention.cache import load_manifest
    from seg4diff_repro.figures import step_label
    from seg4diff_repro.figures.segmentation_appendix import drawn_colours, plot_overlays, view_palette
    from seg4diff_repro.segmentation.overlays import overlay_rows

    unsupervised = args.mode == "unsupervised"
    rows, classes, view_names = overlay_rows(
        Path(args.cache), Path(args.dataset_root), args.layer, args.n, unsupervised=unsupervised,
        kl_threshold=args.kl_threshold,
    )
    extra = max(int(row["prediction"].max()) + 1 for row in rows) - len(view_names)
    palette = view_palette(Path(args.dataset_root), view_names, max(extra, 0))
    noising = load_manifest(Path(args.cache))["noising"]
    title = f"{args.title}, {step_label(noising['k'], noising['num_steps'], noising['index'], noising['sigma'])}"
    footer = ("Ground truth: unlabelled pixels (ignore index) left unpainted. Colours: one per class of the dataset, "
              "the same in every figure of it" + (", none of the colours its images draw the classes in"
                                                  if drawn_colours(Path(args.dataset_root)) else "") + ".")
    if unsupervised:
        footer += (" Prediction: each proposal in the colour of the class the per-image Hungarian matching gives "
                   f"it, unmatched proposals in other colours; τ = {args.kl_threshold:g}.")
    plot_overlays(rows, title, palette, Path(args.png), Path(args.pdf), legend=None if unsupervised else classes,
                  footer=footer)


def _main_table(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.tables.segmentation_appendix import main_table, write_main_table

    entries = json.loads(args.entries)
    for entry in entries:
        entry["scores"] = pd.read_csv(entry.pop("path"))
    table = main_table(entries, args.kind)
    title = args.title
    note = (
        "Our models at their analysis layer beside the paper's main-text table (`paper_mIoU`; empty or – where "
        "it has no such entry; the paper's numbers are for its own models at layer 9, Flux's layer is not stated). "
        "`paper_model`/`paper_dataset`: what the configured `model`/`dataset` stand in for. Each row carries "
        "the settings that produced it (timestep k of the model's own schedule, σ, prompt, resize, attention, "
        "seed, images, code version)."
    )
    if args.kind == "unsupervised":
        thresholds = ", ".join(f"{value:g}" for value in sorted(table["kl_threshold"].unique()))
        title = f"{title}, τ = {thresholds}"
        note += (
            f" τ (`kl_threshold`) is the symmetric-KL threshold that merges the empty prompt's 77 token maps into "
            f"proposals: here {thresholds}; the official code hard-codes 0.1 (its config's 0.035 is never read)."
        )
    write_main_table(table, title, note, args.csv, args.markdown)


def _magnet_effect_table(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.models.common import adapter_record
    from seg4diff_repro.tables.magnet import magnet_effect, write_magnet_effect

    if len(args.variants) != len(args.adapters):
        raise SystemExit(f"--variants ({len(args.variants)}) and --adapters ({len(args.adapters)}) must name one "
                         "score file and one adapter folder per MAGNET variant, in the same order")
    variants = [(pd.read_csv(scores), adapter_record(folder)) for scores, folder in zip(args.variants, args.adapters)]
    write_magnet_effect(magnet_effect(pd.read_csv(args.base), variants, args.layer), args.title, args.csv,
                        args.markdown)


def add_segmentation_appendix_commands(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("score-heads", help="per-(layer, head) scores, streamed (appendix Fig. 4)")
    command.add_argument("--settings", required=True, help="JSON of ExtractionSettings")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--out", required=True, help="CSV; finished shards are kept in <out without .csv>.shards/")
    command.add_argument("--device", default="cpu")
    command.add_argument("--batch-size", type=int, default=4)
    command.add_argument("--shard-size", type=int, default=32, help="images per resumable shard")
    command.set_defaults(handler=_score_heads)

    command = commands.add_parser("head-figure", help="Fig. 4: layer x head mIoU heatmap and table")
    command.add_argument("--scores", required=True, help="CSV of score-heads")
    _outputs(command, table=True, figure=True)
    command.set_defaults(handler=_head_figure)

    command = commands.add_parser("timestep-panels", help="Fig. 2: timestep sweeps side by side")
    command.add_argument("--tables", nargs="+", required=True, help="timestep-sweep CSVs, one per panel")
    command.add_argument("--labels", nargs="+", required=True, help="panel titles, one per table")
    command.add_argument("--provenance", nargs="+", required=True,
                         help="raw score CSVs, one per panel in the order of --tables: each panel's settings")
    _outputs(command, table=True, figure=True)
    command.set_defaults(handler=_timestep_panels)

    command = commands.add_parser("normalisation-panels", help="appendix Table 1 over several datasets")
    command.add_argument("--tables", nargs="+", required=True, help="normalisation-table CSVs, one per dataset")
    command.add_argument("--labels", nargs="+", required=True, help="panel titles, one per table")
    command.add_argument("--provenance", nargs="+", required=True,
                         help="raw score CSVs, one per panel in the order of --tables: each panel's settings")
    _outputs(command, table=True, figure=False)
    command.set_defaults(handler=_normalisation_panels)

    command = commands.add_parser("appendix-per-layer", help="Figs. 8, 11: per-layer curves and table")
    command.add_argument("--scores", required=True, help="per-layer score CSV of score-layers")
    command.add_argument("--paper-model", required=True, help="row of the paper's tables (sd3_medium, ...)")
    command.add_argument("--paper-dataset", required=True, help="column of the paper's tables (voc20, ...)")
    command.add_argument("--backbone", choices=["sd3", "flux"], required=True, help="the model's backbone")
    command.add_argument("--model-source", required=True,
                         help="the model's source (Flux: its transformer config says where single-stream blocks begin)")
    _outputs(command, table=True, figure=True)
    command.set_defaults(handler=_appendix_per_layer)

    command = commands.add_parser("overlays", help="Figs. 21-26: qualitative overlays from a cache")
    command.add_argument("--cache", required=True, help="manifest.json of the attention cache")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--layer", type=int, required=True)
    command.add_argument("--n", type=int, default=4, help="number of images (the first of the split)")
    command.add_argument("--mode", choices=["ovss", "unsupervised"], required=True,
                         help="ovss: oracle-prompt predictions; unsupervised: matched empty-prompt proposals")
    command.add_argument("--kl-threshold", type=float, default=0.1)
    _outputs(command, table=False, figure=True)
    command.set_defaults(handler=_overlays)

    command = commands.add_parser("main-table", help="main Tables 1/2: our rows beside the paper's")
    command.add_argument("--kind", choices=["ovss", "unsupervised"], required=True,
                         help="ovss: main Table 1; unsupervised: main Table 2")
    command.add_argument("--entries", required=True,
                         help="JSON list of {path, layer, paper_model, paper_dataset, role_model, role_dataset}")
    _outputs(command, table=True, figure=False)
    command.set_defaults(handler=_main_table)

    command = commands.add_parser("magnet-effect-table",
                                  help="MAGNET: base model vs its LoRA variants at the supervised layer")
    command.add_argument("--base", required=True, help="per-layer score CSV of score-layers for the base model")
    command.add_argument("--variants", nargs="+", required=True,
                         help="per-layer score CSVs of its MAGNET variants (models with `lora`), one per variant")
    command.add_argument("--adapters", nargs="+", required=True,
                         help="the adapter folder of each variant (results/magnet/<run>/adapter), in the order of --variants")
    command.add_argument("--layer", type=int, required=True, help="the supervised layer (the base model's analysis_layer)")
    _outputs(command, table=True, figure=False)
    command.set_defaults(handler=_magnet_effect_table)
