"""Generation subcommands of `seg4diff-repro` (appendix Figs. 1, 5, 7, 10, 18, 19).

``generate-run`` makes one run (one model, one perturbed or guided layer or none, every prompt and
seed), ``score-fidelity`` scores runs against the unperturbed one, ``fidelity-figure`` draws the
curves and writes the table of one model, ``generation-grid`` draws the image grid of Fig. 18 or 19,
``prompts-figure`` lists the 50 DrawBench prompts (Fig. 1) and which analyses use which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# What the paper says about each figure (it gives numbers only as plots).
PAPER_CLAIMS = {
    "sd3": "Paper (SD3): fidelity drops noticeably when layer 9 is perturbed; numbers only as a plot.",
    "sd35": "Paper (SD3.5): numbers only as a plot; layer 9 is the semantic-grounding layer, as in SD3.",
    "flux": "Paper (Flux): numbers only as a plot, for the 19 double-stream (MM-DiT) layers; layers 12 and 17 "
            "are Flux's grounding layers.",
}


def _figure_name(figure: str) -> str:
    return f"Fig. {int(figure.removeprefix('fig'))}"


def _generate_run(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from seg4diff_repro.generation.runs import GenerationRun, run_generation

    # Device and batch size are operational: separate arguments, recorded in the run's manifest.
    run = replace(GenerationRun.from_json(args.settings), device=args.device, batch_size=args.batch_size)
    run_generation(run, Path(args.out))


def _score_fidelity(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.generation.fidelity import FidelityScorer, FidelitySettings, score_run

    scorer = FidelityScorer(
        FidelitySettings(**json.loads(args.settings)), toy_model=args.toy_model, model=args.model, device=args.device
    )
    scores = pd.concat([score_run(Path(run), Path(args.reference), scorer) for run in args.runs], ignore_index=True)
    atomic_write_bytes(Path(args.out), scores.to_csv(index=False).encode())


def _fidelity_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.figures.generation import plot_fidelity_curves
    from seg4diff_repro.generation.runs import read_run
    from seg4diff_repro.tables.fidelity import fidelity_table, model_label, run_scale, write_fidelity_table

    manifest, _ = read_run(args.reference)
    table = fidelity_table(pd.read_csv(args.scores))
    first = table.iloc[0]
    label = model_label(manifest["run"]["model"], args.paper_name, args.role)
    sampling = manifest["sampling"]
    flux = manifest["run"]["backbone"] == "flux"
    perturbation = (f"post-softmax I2T attention of one layer blurred along the text keys (Gaussian σ = "
                    f"{sampling['blur_sigma']:g}, k = {sampling['blur_kernel']}, reflect padding) at every step"
                    + ("" if flux else ", in both classifier-free-guidance branches"))
    notes = [
        f"Model: {label}. Scale: {run_scale(manifest)}. Perturbation: {perturbation}"
        + ("; double-stream (MM-DiT) layers only, as in the paper's caption" if flux else "") + ".",
        "Reference: the unperturbed image of the same prompt and seed (CLIP-I and DINO are 1 for it). "
        f"Backbones: CLIP {first['clip_backbone']}; DINO {first['dino_backbone']} (CLS token).",
        PAPER_CLAIMS[args.role],
    ]
    if first["fidelity_weights"] == "random":
        notes.append("Toy world: the CLIP and DINO backbones have random weights, so these scores only show "
                     "that the pipeline runs; they measure nothing.")
    figure = _figure_name(args.figure)
    title = f"Appendix {figure}: image fidelity under single-layer I2T perturbation, {label}"
    write_fidelity_table(table, title, notes, Path(args.csv), Path(args.markdown))
    footer = (f"{run_scale(manifest)}; blur σ = {sampling['blur_sigma']:g}, k = {sampling['blur_kernel']}. "
              f"CLIP: {first['clip_backbone']}; DINO: {first['dino_backbone']}.")
    plot_fidelity_curves(table, f"{figure}: fidelity under I2T perturbation, {label}", footer,
                         Path(args.png), Path(args.pdf))


def _generation_grid(args: argparse.Namespace) -> None:
    from seg4diff_repro.figures.generation import plot_layer_grid
    from seg4diff_repro.generation.runs import read_run
    from seg4diff_repro.tables.fidelity import model_label, run_scale

    manifest, reference = read_run(args.reference)
    runs = [read_run(folder) for folder in args.runs]
    by_layer = {run_manifest["layer"]: images for run_manifest, images in runs}
    mode = runs[0][0]["mode"]
    prompts = [entry["prompt"] for entry in manifest["images"]]
    sampling = manifest["sampling"]
    label = model_label(manifest["run"]["model"], args.paper_name, args.role)
    if mode == "guidance":
        what = (f"perturbed-I2T guidance at each layer, s = {sampling['guidance_scale']:g} (not stated in the paper: "
                "an assumption)")
        reference_label = "no guidance"
    else:
        what = "I2T attention perturbation at each layer"
        reference_label = "unperturbed"
    title = (f"Appendix {_figure_name(args.figure)}: {what}\n{label}; {run_scale(manifest)}; blur σ = "
             f"{sampling['blur_sigma']:g}, k = {sampling['blur_kernel']}")
    plot_layer_grid(prompts, reference, by_layer, reference_label, title, Path(args.png), Path(args.pdf))


def _prompts_figure(args: argparse.Namespace) -> None:
    import pandas as pd

    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.figures.prompts import plot_prompt_list
    from seg4diff_repro.generation.prompts import load_prompts

    prompts = load_prompts()  # the packaged DrawBench 50, verbatim from the appendix
    # analysis -> how many of the first prompts it uses: null for all, a file name for its own prompts file.
    usage = json.loads(args.usage)
    used_by = [
        ", ".join(name for name, count in usage.items()
                  if count is None or (isinstance(count, int) and number <= count))
        for number in range(1, len(prompts) + 1)
    ]
    table = pd.DataFrame({"number": range(1, len(prompts) + 1), "prompt": prompts, "used_by": used_by})
    uses = "; ".join(
        f"{name}: " + ("all 50" if count is None else f"the first {count}" if isinstance(count, int)
                       else f"its own prompts file {count}, none of these")
        for name, count in usage.items()
    )
    note = (f"Verbatim from the appendix (typos and punctuation kept), in its order. This config's analyses use: "
            f"{uses}.")
    atomic_write_bytes(Path(args.csv), table.to_csv(index=False).encode())
    body = table.to_markdown(index=False)
    atomic_write_bytes(Path(args.markdown), f"# {args.title}\n\n{note}\n\n{body}\n".encode())
    plot_prompt_list(prompts, args.title, note, Path(args.png), Path(args.pdf))


def add_generation_commands(commands: argparse._SubParsersAction) -> None:
    """Register the generation subcommands on the main parser's subparsers."""
    command = commands.add_parser("generate-run", help="images of one model with one perturbed/guided layer (or none)")
    command.add_argument("--settings", required=True, help="JSON of GenerationRun (model, prompts, seeds, run, ...)")
    command.add_argument("--device", default="cpu", help="cpu, cuda (a free GPU of this host), cuda:N")
    command.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    command.add_argument("--out", required=True, help="run folder: PNG images and manifest.json (replaced atomically)")
    command.set_defaults(handler=_generate_run)

    command = commands.add_parser("score-fidelity", help="CLIP-I, CLIP-T and DINO of runs against the unperturbed run")
    command.add_argument("--runs", nargs="+", required=True, help="run folders to score (the unperturbed one included)")
    command.add_argument("--reference", required=True, help="the unperturbed run folder (same prompts and seeds)")
    command.add_argument("--settings", required=True, help="JSON of FidelitySettings (backbones and weights)")
    command.add_argument("--model", required=True, help="configured model name (for messages)")
    command.add_argument("--toy-model", action="store_true",
                         help="the model is a toy model (`toy: true`): only then are random-weight backbones allowed")
    command.add_argument("--device", default="cpu")
    command.add_argument("--out", required=True, help="CSV, one row per image of each run")
    command.set_defaults(handler=_score_fidelity)

    command = commands.add_parser("fidelity-figure", help="appendix Fig. 5/7/10: fidelity table and curves")
    command.add_argument("--scores", required=True, help="score CSV of score-fidelity (the unperturbed run included)")
    command.add_argument("--reference", required=True, help="the unperturbed run folder (for the settings)")
    command.add_argument("--role", required=True, choices=["sd3", "sd35", "flux"],
                         help="the paper's model it stands for")
    command.add_argument("--figure", required=True, help="figure key, e.g. fig05")
    command.add_argument("--paper-name", default=None, help="the model's paper_name, if it is the paper's model")
    for name in ("csv", "markdown", "png", "pdf"):
        command.add_argument(f"--{name}", required=True)
    command.set_defaults(handler=_fidelity_figure)

    command = commands.add_parser("prompts-figure", help="appendix Fig. 1: the 50 DrawBench prompts, figure and table")
    command.add_argument("--usage", required=True,
                         help='JSON: analysis -> number of the first prompts it uses, null for all, e.g. '
                         '{"fidelity (Figs. 5, 7, 10)": 4}')
    command.add_argument("--title", required=True, help="figure and table title")
    for name in ("csv", "markdown", "png", "pdf"):
        command.add_argument(f"--{name}", required=True)
    command.set_defaults(handler=_prompts_figure)

    command = commands.add_parser("generation-grid", help="appendix Fig. 18/19: labelled image grid over layers")
    command.add_argument("--reference", required=True, help="the unperturbed (unguided) run folder")
    command.add_argument("--runs", nargs="+", required=True, help="one run folder per layer")
    command.add_argument("--role", required=True, choices=["sd3", "sd35", "flux"],
                         help="the paper's model it stands for")
    command.add_argument("--figure", required=True, help="figure key, e.g. fig18")
    command.add_argument("--paper-name", default=None, help="the model's paper_name, if it is the paper's model")
    for name in ("png", "pdf"):
        command.add_argument(f"--{name}", required=True)
    command.set_defaults(handler=_generation_grid)
