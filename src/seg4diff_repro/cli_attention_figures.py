"""Attention-figure subcommands of `seg4diff-repro`: value norms, PCA of q/k/v and token maps, all recorded
during generation (appendix Figs. 3, 6, 9, 12-17).

``add_attention_figure_commands(subparsers)`` registers them on the main parser. Each command gets the
configured model as ``--model-settings`` JSON (its key, the paper role it stands in for, how to load it),
so every output can say which model stands in for which paper model, and at what scale.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from seg4diff_repro.progress import progress

from seg4diff_repro.steps import PAPER_STEPS, STEP_CONVENTIONS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from seg4diff_repro.models.flux import FluxAdapter
    from seg4diff_repro.models.sd3 import SD3Adapter

log = logging.getLogger(__name__)

PAPER_MODELS = {"sd3": "SD3-medium", "sd35": "SD3.5-medium", "flux": "FLUX.1-dev"}
TOKEN_MAP_FIGURES = ("fig03", "fig12", "fig13", "fig14", "fig17")


def _load(settings: dict, device: str) -> SD3Adapter | FluxAdapter:
    from seg4diff_repro.models import load_adapter

    return load_adapter(settings["backbone"], settings["source"], settings["dtype"], device,
                        settings.get("revision"), **settings.get("options", {}))


def _model_record(settings: dict) -> dict[str, str | None]:
    """Source, configured revision and fingerprint of the loaded model (after `_load`: a hub id's commit is
    read from the cache that loading filled)."""
    from seg4diff_repro.models.common import model_record

    return model_record(settings["source"], settings.get("revision"))


def _scale(settings: dict, adapter: SD3Adapter | FluxAdapter) -> str:
    """"toy scale: 64 px, 16×16 image tokens, 6 layers × 4 heads" (or "full scale: …")."""
    rows, cols = adapter.token_grid
    heads = adapter.transformer.config.num_attention_heads
    kind = "toy scale" if settings.get("toy") else "full scale"
    return f"{kind}: {adapter.image_size} px, {rows}×{cols} image tokens, {adapter.num_layers} layers × {heads} heads"


def _stand_in(settings: dict, scale: str) -> str:
    return f"{PAPER_MODELS[settings['role']]} ← {settings['model']} ({scale})"


def _grid(maps: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[..., n_image] tensor → [..., rows, cols] numpy."""
    return maps.reshape(*maps.shape[:-1], *grid).cpu().numpy()


def _value_norms(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.attention.value_norms import value_norm_statistics
    from seg4diff_repro.generation.prompts import load_prompts

    settings = json.loads(args.model_settings)
    adapter = _load(settings, args.device)
    prompts = load_prompts(limit=args.prompts)  # the packaged DrawBench 50
    seeds = [args.seed + i for i in range(len(prompts))]
    per_head, per_layer = value_norm_statistics(
        adapter, prompts, seeds, args.timesteps, settings["num_steps"], args.cfg, args.step_convention
    )
    provenance = {"model": settings["model"], "scale": _scale(settings, adapter), "num_steps": settings["num_steps"],
                  "cfg": "n/a (guidance embedding)" if adapter.backbone == "flux" else args.cfg, "seed": args.seed,
                  **_model_record(settings)}
    for table, path in ((per_head, args.per_head), (per_layer, args.per_layer)):
        atomic_write_bytes(Path(path), table.assign(**provenance).to_csv(index=False).encode())


def _convention_note(convention: str) -> str:
    """How "t = k" was placed on the schedule (`seg4diff_repro.steps.step_index`), for tables and captions."""
    if convention == "official":
        return ("t = k is timesteps[-k] of the model's own N-step schedule (schedule index N − k), the official "
                "code's timestep convention (step_convention: official); on Flux's 50 steps t = 28 is index 22, "
                "not the first step. step_convention: paper places the paper's \"t = k of 28\" at the same "
                "fraction of the schedule instead (t = 28 the first step).")
    return ("t = k is the paper's \"t = k of 28\" placed at the same fraction of the model's N-step schedule, "
            "index round((28 − k) · N / 28) (step_convention: paper): t = 28 is the first step (σ = 1) on every "
            "schedule. The official code's timesteps[-k] (step_convention: official) puts t = 28 of Flux's 50 "
            "steps at index 22.")


def _step_label(frame: pd.DataFrame, k: int) -> str:
    """The step label of the rows of ``frame`` at timestep ``k``."""
    from seg4diff_repro.figures import step_label

    row = frame[frame["timestep_k"] == k].iloc[0]
    paper_steps = PAPER_STEPS if row["step_convention"] == "paper" else None
    return step_label(int(k), int(row["num_steps"]), int(row["step_index"]), float(row["sigma"]), paper_steps)


def _table_provenance(frame: pd.DataFrame, role: str) -> pd.Series:
    import pandas as pd

    from seg4diff_repro.provenance import provenance_label

    first = frame.iloc[0]
    return pd.Series({
        "model": f"{first['model']} standing in for {PAPER_MODELS[role]} ({first['scale']})",
        "prompt": f"the first {int(first['n_prompts'])} DrawBench prompts (appendix Fig. 1)",
        "attention": f"value features of the conditional branch during generation, {first['num_steps']} steps, "
        f"CFG {first['cfg']}, step_convention = {first['step_convention']}",
        "seed": f"{first['seed']} + prompt index",
        "model_fingerprint": first["model_fingerprint"],
        "code_version": provenance_label(),
    })


def _value_norm_heads_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.value_norms import plot_value_norm_heads
    from seg4diff_repro.tables.sweeps import write_table
    from seg4diff_repro.tables.value_norms import PAPER_CLAIMS, peak_layers, value_norm_heads_table

    per_head = pd.concat([pd.read_csv(path) for path in args.per_head], ignore_index=True)
    first = per_head.iloc[0]
    title = (f"Appendix Fig. 15, mean L2 norm of value tokens by layer and head: {PAPER_MODELS[args.role]} ← "
             f"{first['model']} ({first['scale']}), {int(first['n_prompts'])} DrawBench prompts")
    write_table(
        value_norm_heads_table(per_head), _table_provenance(per_head, args.role), title,
        "Mean over prompts of the mean L2 norm of each head's value slice, per token group: image tokens, the 77 "
        f"text positions, the prompt's own tokens (<sos> … <eos>). {_convention_note(first['step_convention'])} "
        f"Layer with the largest head-mean norm here: {peak_layers(per_head)}. The paper: {PAPER_CLAIMS[args.role]}.",
        args.csv, args.markdown,
    )
    labels = {k: _step_label(per_head, k) for k in per_head["timestep_k"].unique()}
    plot_value_norm_heads(per_head, title, labels, Path(args.png), Path(args.pdf))


def _value_norm_layers_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.value_norms import plot_value_norm_layers
    from seg4diff_repro.tables.sweeps import write_table
    from seg4diff_repro.tables.value_norms import PAPER_CLAIMS, peak_layers, value_norm_layers_table

    per_layer = pd.concat([pd.read_csv(path) for path in args.per_layer], ignore_index=True)
    first = per_layer.iloc[0]
    title = (f"Appendix Fig. {args.figure_number}, mean L2 norm of values per layer: {PAPER_MODELS[args.role]} ← "
             f"{first['model']} ({first['scale']}), {int(first['n_prompts'])} DrawBench prompts")
    flux_note = (" Flux: text = the 77 T5 positions; layers from the first `single` block on are single-stream "
                 "blocks, whose values of all tokens come from one projection.") if args.role == "flux" else ""
    write_table(
        value_norm_layers_table(per_layer), _table_provenance(per_layer, args.role), title,
        "Mean over prompts of the mean L2 norm of the whole value vector (all heads) per token group. "
        f"{_convention_note(first['step_convention'])}{flux_note} Peak layers here: {peak_layers(per_layer)}. "
        f"The paper: {PAPER_CLAIMS[args.role]}.",
        args.csv, args.markdown,
    )
    labels = {k: _step_label(per_layer, k) for k in per_layer["timestep_k"].unique()}
    plot_value_norm_layers(per_layer, title, labels, Path(args.png), Path(args.pdf))


def _noising_label(noising, convention: str) -> str:
    """`figures.step_label` of a recorded `Noising` under ``convention``."""
    from seg4diff_repro.figures import step_label

    paper_steps = PAPER_STEPS if convention == "paper" else None
    return step_label(noising.k, noising.num_steps, noising.index, noising.sigma, paper_steps)


def _pca_qkv_figure(args: argparse.Namespace) -> None:
    from seg4diff_repro.attention.during_generation import generate_and_record
    from seg4diff_repro.figures.pca import QKV, pca_rgb, plot_pca_qkv
    from seg4diff_repro.generation.prompts import figure_prompts

    settings = json.loads(args.model_settings)
    adapter = _load(settings, args.device)
    prompt = figure_prompts("fig16")[0]
    generated = generate_and_record(
        adapter, prompt, args.seed, [args.timestep], settings["num_steps"], cfg=args.cfg, layers=None,
        record=("qkv",), step_convention=args.step_convention,
    )
    qkv = generated.recordings[args.timestep].qkv
    layers = sorted(qkv)
    rgb = {(layer, name): pca_rgb(qkv[layer][name][0], adapter.token_grid) for layer in layers for name in QKV}
    title = (f"Appendix Fig. 16, PCA (3 components → RGB) of image-token q, k, v: “{prompt}”, "
             f"{_noising_label(generated.noising[args.timestep], args.step_convention)}, seed {args.seed}\n"
             f"{_stand_in(settings, _scale(settings, adapter))}")
    plot_pca_qkv(generated.image, rgb, layers, title, Path(args.png), Path(args.pdf), model=_model_record(settings))


def _token_maps_figure(args: argparse.Namespace) -> None:
    import numpy as np

    from seg4diff_repro.attention.during_generation import find_token, generate_and_record, token_labels
    from seg4diff_repro.figures.token_maps import PromptMaps, plot_direction_maps, plot_head_maps, plot_token_grid
    from seg4diff_repro.generation.prompts import figure_prompts

    settings = json.loads(args.model_settings)
    adapter = _load(settings, args.device)
    figure, k, num_steps = args.figure, args.timestep, settings["num_steps"]
    grid = adapter.token_grid
    layer = settings["analysis_layer"]
    prompt_set = {"fig03": "fig03", "fig12": "fig12", "fig13": "fig13_14", "fig14": "fig13_14", "fig17": "fig17"}
    prompts = figure_prompts(prompt_set[figure])
    if figure in ("fig13", "fig14"):
        index = 0 if figure == "fig13" else 1
        prompts, seeds = prompts[index : index + 1], [args.seed + index]
    else:
        seeds = [args.seed + i for i in range(len(prompts))]

    if figure == "fig03" and len(args.keywords or []) != len(prompts):
        raise ValueError(f"fig03 has {len(prompts)} prompts: give one list of keywords for each, got {args.keywords!r}")
    per_head = figure in ("fig13", "fig14")
    layers = [layer] if not per_head else (list(range(adapter.num_layers)) if args.layers is None else args.layers)
    record = ("i2t",) if figure in ("fig13", "fig14", "fig17") else ("i2t", "t2i")
    entries = []
    for position, (prompt, seed) in enumerate(progress(list(zip(prompts, seeds)), desc=figure, unit="prompt")):
        generated = generate_and_record(adapter, prompt, seed, [k], num_steps, cfg=args.cfg, layers=layers,
                                        record=record, heads=None if per_head else "mean",
                                        step_convention=args.step_convention)
        recording, labels = generated.recordings[k], token_labels(adapter.tokenizer, prompt)
        if figure == "fig03":
            tokens = [find_token(labels, word) for word in args.keywords[position]]
        elif figure == "fig12":
            tokens = [i for i, label in enumerate(labels) if label != "<pad>"]  # <sos> … <eos>
        elif figure == "fig17":
            tokens = list(range(len(labels)))
        else:
            tokens = [find_token(labels, args.keywords[index])]
        log.info("%s: %r, tokens %s", figure, prompt, [labels[t] for t in tokens])
        entries.append((generated, labels, tokens, recording))

    when = f"{_noising_label(entries[0][0].noising[k], args.step_convention)}, during generation"
    stand_in = _stand_in(settings, _scale(settings, adapter))
    png, pdf, model = Path(args.png), Path(args.pdf), _model_record(settings)
    if figure in ("fig03", "fig12"):
        what = "I2T vs T2I maps of keywords" if figure == "fig03" else "I2T and T2I maps of all prompt tokens"
        title = f"Appendix Fig. {int(figure[3:])}, {what}: layer {layer}, head mean, {when}\n{stand_in}"
        plot_direction_maps(
            [PromptMaps(g.prompt, g.image, [labels[t] for t in tokens], _grid(r.i2t[layer][0, 0].T[tokens], grid),
                        _grid(r.t2i[layer][0, 0][tokens], grid)) for g, labels, tokens, r in entries],
            title, png, pdf, model=model,
        )
    elif figure == "fig17":
        generated, labels, tokens, recording = entries[0]
        title = (f"Appendix Fig. 17, all {len(tokens)} token maps (I2T) of unconditional generation (prompt \"\"): "
                 f"layer {layer}, head mean, {when}\n{stand_in}")
        plot_token_grid(generated.image, labels, _grid(recording.i2t[layer][0, 0].T, grid), title, png, pdf,
                        model=model)
    else:
        generated, labels, tokens, recording = entries[0]
        maps = np.stack([_grid(recording.i2t[at][0].transpose(-1, -2)[:, tokens[0]], grid) for at in layers])
        title = (f"Appendix Fig. {int(figure[3:])}, head-mean and per-head I2T maps of “{labels[tokens[0]]}”: "
                 f"{when}\n{stand_in}")
        plot_head_maps(generated.prompt, generated.image, labels[tokens[0]], maps, layers, title, png, pdf, model=model)


def add_attention_figure_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register value-norms, value-norm-heads-figure, value-norm-layers-figure, pca-qkv-figure, token-maps-figure."""

    def common(command: argparse.ArgumentParser, *, generation: bool, figure: bool = True, table: bool = False) -> None:
        if generation:
            command.add_argument("--model-settings", required=True,
                                 help="JSON: model, role, backbone, source, dtype, options, num_steps, "
                                 "analysis_layer, toy")
            command.add_argument("--device", default="cpu", help="cpu, cuda (a free GPU of this host), cuda:N")
            command.add_argument("--seed", type=int, default=0, help="seed of the starting noise (prompt i: seed + i)")
            command.add_argument("--cfg", type=float, default=7.5, help="SD3/SD3.5 classifier-free guidance scale")
            command.add_argument("--step-convention", choices=STEP_CONVENTIONS, default="official",
                                 help="where 't = k' lies: 'official' timesteps[-k] of the model's schedule, "
                                 "'paper' the same fraction of it as t = k of 28")
        for flag in (("--csv", "--markdown") if table else ()) + (("--png", "--pdf") if figure else ()):
            command.add_argument(flag, required=True)

    command = subparsers.add_parser("value-norms", help="mean value L2 norms per layer and head during generation")
    common(command, generation=True, figure=False)
    command.add_argument("--prompts", type=int, default=None, help="first N DrawBench prompts (default: all 50)")
    command.add_argument("--timesteps", type=int, nargs="+", default=[8, 28], help="k of 't = k' (see --step-convention)")
    command.add_argument("--per-head", required=True, help="CSV: one row per (k, layer, head)")
    command.add_argument("--per-layer", required=True, help="CSV: one row per (k, layer)")
    command.set_defaults(handler=_value_norms)

    command = subparsers.add_parser("value-norm-heads-figure", help="appendix Fig. 15: layer x head heatmaps + table")
    command.add_argument("--per-head", nargs="+", required=True, help="per-head CSVs of `value-norms`")
    command.add_argument("--role", choices=sorted(PAPER_MODELS), required=True, help="the paper model stood in for")
    common(command, generation=False, table=True)
    command.set_defaults(handler=_value_norm_heads_figure)

    command = subparsers.add_parser("value-norm-layers-figure", help="appendix Figs. 6, 9: per-layer curves + table")
    command.add_argument("--per-layer", nargs="+", required=True, help="per-layer CSVs of `value-norms`")
    command.add_argument("--role", choices=sorted(PAPER_MODELS), required=True, help="the paper model stood in for")
    command.add_argument("--figure-number", type=int, required=True, help="appendix figure number (6, 9)")
    common(command, generation=False, table=True)
    command.set_defaults(handler=_value_norm_layers_figure)

    command = subparsers.add_parser("pca-qkv-figure", help="appendix Fig. 16: PCA RGB of image q/k/v of every layer")
    common(command, generation=True)
    command.add_argument("--timestep", type=int, default=8, help="k of 't = k' (see --step-convention)")
    command.set_defaults(handler=_pca_qkv_figure)

    command = subparsers.add_parser("token-maps-figure", help="appendix Figs. 3, 12, 13, 14, 17: token maps")
    common(command, generation=True)
    command.add_argument("--figure", choices=TOKEN_MAP_FIGURES, required=True, help="which appendix figure")
    command.add_argument("--timestep", type=int, default=8, help="k of 't = k' (see --step-convention)")
    command.add_argument("--keywords", type=json.loads, default=None,
                         help="JSON: fig03 a list of words per prompt; fig13/fig14 one word per fig13_14 prompt")
    command.add_argument("--layers", type=json.loads, default=None,
                         help="JSON list of layers for fig13/fig14 (default: every layer)")
    command.set_defaults(handler=_token_maps_figure)
