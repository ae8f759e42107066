"""Help texts of the `seg4diff-repro` command line: the formatter, the options every stage shares, and the
keys of the JSON options (``--settings``, ``--model-settings``, ``--entries``) that the Snakemake rules build.

`finish_commands` runs once after every subcommand is registered: it gives each subcommand a description
(its one-line help unless it has its own), the shared options their help, and the JSON options an epilog
listing their keys. Nothing here imports torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap

# Options that mean the same in every command that has them; a command's own help text wins.
SHARED_OPTION_HELP = {
    "--dataset-root": "prepared dataset folder, <data.root>/prepared/<name> (images, labels, splits, classes.json)",
    "--device": "torch device: cpu, cuda (a free GPU of this host, see gpu_slots), cuda:1, ...",
    "--batch-size": "images per forward pass",
    "--layer": "0-based joint layer the output reports (the model's analysis_layer)",
    "--kl-threshold": "τ of the symmetric-KL merging of the unsupervised proposals (0.1 in the official code)",
    "--csv": "output table as CSV",
    "--markdown": "output table as Markdown, with the settings it was computed with",
    "--png": "output figure as PNG",
    "--pdf": "output figure as PDF",
}

_EXTRACTION_KEYS = {
    "model": "configured model name (a key of `models`)",
    "dataset": "configured dataset name (a key of `datasets`)",
    "backbone": "sd3 (SD3, SD3.5) or flux",
    "source": "Hugging Face id or local save_pretrained folder",
    "revision": "hub commit of `source` (models.<model>.revision), or null",
    "lora": "folder of the MAGNET adapter applied after loading (results/magnet/<models.<model>.lora>/adapter), or null",
    "dtype": "float32, float16 or bfloat16",
    "model_options": "models.<model>.options (Flux switches; {} otherwise)",
    "timestep": "k of 't = k of N': the input is noised to timesteps[-k]",
    "num_steps": "N, the length of the schedule (models.<model>.num_inference_steps)",
    "layers": "0-based joint layers to record, or \"all\"",
    "seed": "base noise seed; each image's seed derives from it and the image id",
    "short_side": "shorter side of the first resize (640), or null",
    "resize": "stretch (official code) or center_crop (paper text)",
    "prompt": "oracle (GT classes), vocabulary (all classes) or null (empty prompt)",
    "background_name": "prompt word of the background class",
    "split": "dataset split (val)",
    "background": "the dataset's background view: class, last, ignore or drop (datasets.<dataset>.background)",
    "limit": "first N images only, or null",
    "cache_format": "version of the cache layout",
    "pad_multiple": "zero-pad to a multiple of it before the stretch (unsupervised, official geometry: 32), or null",
    "prompt_classes_from": "label the oracle class set is read from: resized (official) or original",
}

_MODEL_SETTINGS_KEYS = {
    "model": "configured model name",
    "role": "the paper model it stands in for: sd3, sd35 or flux",
    "backbone": "sd3 or flux",
    "source": "Hugging Face id or local save_pretrained folder",
    "revision": "hub commit of `source` (models.<model>.revision), or null",
    "dtype": "float32, float16 or bfloat16",
    "options": "models.<model>.options",
    "num_steps": "sampling steps (models.<model>.num_inference_steps)",
    "analysis_layer": "0-based layer of the token maps",
    "toy": "true for a toy-world model (titles say 'toy scale')",
}

# command -> (option, what the JSON holds, where the rules build it and from which config keys, {key: meaning}).
SETTINGS_JSON: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "extract-attention": (
        "--settings", "an object of ExtractionSettings (seg4diff_repro.attention.extract)",
        "in workflow/rules/common.smk (_extraction_settings) from models.<model>, datasets.<dataset> and "
        "attention; for unsupervised segmentation with prompt null, layers [analysis_layer] and pad_multiple",
        _EXTRACTION_KEYS,
    ),
    "score-heads": (
        "--settings", "an object of ExtractionSettings (seg4diff_repro.attention.extract)",
        "in workflow/rules/common.smk (extraction_settings) for the model and dataset standing in for appendix "
        "Fig. 4's",
        _EXTRACTION_KEYS,
    ),
    "score-layers": (
        "--settings", "an object of ScoringSettings (seg4diff_repro.segmentation.score)",
        "from the config's `segmentation` section (workflow/rules/segmentation.smk), or as one of the four "
        "appendix Table 1 variants (NORMALISATION_VARIANTS in workflow/rules/analyses.smk)",
        {
            "softmax": "score post-softmax maps (true) or pre-softmax logits (false)",
            "norm_before_merge": "min-max each token map over pixels before averaging a class's tokens",
            "norm_after_merge": "min-max each class map over pixels",
            "prompt_overflow": "classes past the 77-token window: official (NaN maps, <eos> averaged) or corrected",
        },
    ),
    "generate-run": (
        "--settings", "an object of GenerationRun (seg4diff_repro.generation.runs)",
        "in workflow/rules/generation_common.smk (generation_run_settings) from models.<model> and "
        "analyses.generation",
        {
            "model": "configured model name",
            "backbone": "sd3 or flux",
            "source": "Hugging Face id or local save_pretrained folder",
            "revision": "hub commit of `source` (models.<model>.revision), or null",
            "dtype": "float32, float16 or bfloat16",
            "device": "torch device; --device replaces it (operational: the rules leave it out of the JSON)",
            "run": "none, perturb_l<layer> or guidance_l<layer>",
            "figure": "caption prompts of this appendix figure (fig18, fig19, fig20), or null for the fidelity prompts",
            "prompts_file": "file of fidelity prompts, one per line, or null for the packaged DrawBench 50",
            "n_prompts": "first N prompts only (of the figure's, or of the fidelity prompts), or null for all",
            "seeds": "noise seeds; each prompt is generated once per seed",
            "steps": "sampling steps",
            "cfg": "classifier-free guidance scale (SD3, SD3.5)",
            "guidance_scale": "s of perturbed-I2T guidance",
            "blur_sigma": "σ of the Gaussian blur along the text keys",
            "blur_kernel": "size of the blur kernel (odd)",
            "max_sequence_length": "T5 tokens of a Flux prompt",
            "distilled_guidance": "Flux guidance embedding (models.<model>.options.guidance_scale)",
            "batch_size": "images per pipeline call; --batch-size replaces it (operational, as the device)",
            "lora": "MAGNET adapter folder (results/magnet/<run>/adapter) applied after loading, or null",
            "prompts_list": "the prompts themselves (a Table 3 prompt set given inline), or null",
        },
    ),
    "score-clipscore": (
        "--settings", "an object of ClipScoreSettings (seg4diff_repro.generation.clipscore)",
        "in workflow/rules/generation_common.smk (clipscore_settings) from analyses.generation.clipscore, "
        "without its device and prompt sets",
        {
            "weights": "pretrained, or random (toy models only)",
            "source": "Hugging Face id or local save_pretrained folder of the CLIP model and processor",
            "revision": "hub commit of the CLIP model (analyses.generation.clipscore.revision), or null",
            "seed": "initialisation seed of random weights",
            "batch_size": "images per scoring batch",
        },
    ),
    "score-fidelity": (
        "--settings", "an object of FidelitySettings (seg4diff_repro.generation.fidelity)",
        "in workflow/rules/generation_common.smk (fidelity_settings) from analyses.generation.fidelity, "
        "without its device",
        {
            "weights": "pretrained, or random (toy models only)",
            "clip_arch": "open_clip architecture of CLIP-I and CLIP-T",
            "clip_pretrained": "open_clip pretrained tag, or a local checkpoint file",
            "dino_source": "Hugging Face id or local folder of the DINO ViT",
            "clip_revision": "hub commit of the CLIP weights (analyses.generation.fidelity.clip_revision), or null",
            "dino_revision": "hub commit of the DINO ViT (analyses.generation.fidelity.dino_revision), or null",
            "seed": "initialisation seed of random weights",
            "batch_size": "images per scoring batch",
        },
    ),
    "main-table": (
        "--entries", "a list of objects, one per (model, dataset) cell",
        "in workflow/rules/appendix_common.smk (main_table_entries) from the config's `appendix` section",
        {
            "path": "per-layer (ovss) or unsupervised score CSV",
            "layer": "the model's analysis layer",
            "paper_model": "row of the paper's table (sd3_medium, ...), or null",
            "paper_dataset": "column of the paper's table (voc20, ...), or null",
            "role_model": "the paper's name of the model stood in for",
            "role_dataset": "the paper's name of the dataset stood in for",
        },
    ),
    "magnet-train": (
        "--settings", "an object describing one MAGNET run",
        "in workflow/rules/magnet.smk (magnet_settings) from magnet.runs.<run>, its base model and data",
        {
            "run": "the run's name (magnet.runs.<run>)",
            "model": "the base model: name, backbone, source, revision, dtype",
            "data": "the training set: format (labels or sa1b), root, split, background, prompt, coco_crop, limit",
            "recipe": "the fields of MagnetRecipe (seg4diff_repro.magnet.train); the official values by default",
            "validation": "for checkpoint_policy best: root and ExtractionSettings of the validation set, or null",
        },
    ),
}
for _command in ("value-norms", "pca-qkv-figure", "token-maps-figure"):
    SETTINGS_JSON[_command] = (
        "--model-settings", "an object describing the configured model",
        "in workflow/rules/attention_figures_common.smk (generation_model_settings) from models.<model>",
        _MODEL_SETTINGS_KEYS,
    )

# The main help lists the commands by stage; a command missing here is listed under "Other".
COMMAND_GROUPS = {
    "Data and models": [
        "download", "download-model", "prepare-dataset", "make-toy-shapes", "make-toy-world", "build-tiny-model",
        "train-toy-model", "magnet-train",
    ],
    "Attention maps and segmentation scores": [
        "extract-attention", "gather-attention", "score-layers", "score-unsupervised", "score-heads",
    ],
    "Segmentation tables and figures": [
        "per-layer-table", "per-layer-figure", "toy-world-summary", "timestep-sweep", "normalisation-table",
        "unsupervised-table", "appendix-per-layer", "timestep-panels", "normalisation-panels", "head-figure",
        "overlays", "main-table", "magnet-effect-table",
    ],
    "Generation: perturbation, fidelity and attention figures": [
        "generate-run", "score-fidelity", "fidelity-figure", "generation-grid", "value-norms",
        "value-norm-heads-figure", "value-norm-layers-figure", "pca-qkv-figure", "token-maps-figure",
        "toy-generations", "prompts-figure", "magnet-grid", "score-clipscore", "clipscore-table",
    ],
    "Report pages": ["table-page", "run-info"],
    "Reviewer verification": ["bundle", "verify", "compare-outputs"],
}

MAIN_EPILOG = """\
Each command is one stage of the pipeline. The Snakemake rules (workflow/rules/*.smk) call them with
paths and settings; `seg4diff-repro COMMAND --help` describes one. Options that take JSON (--settings,
--model-settings, --entries) are built by the rules from the config; each such command's help lists the keys.
The method each stage implements: docs/method.md."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (not for required options, flags or None), wraps prose, keeps indented blocks as written."""

    def __init__(self, prog: str, **kwargs) -> None:
        super().__init__(prog, max_help_position=30, **kwargs)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            "%(default)" in help_text
            or action.required
            or action.default in (None, argparse.SUPPRESS)
            or action.nargs == 0  # flags: --no-progress, --version, -h
        ):
            return help_text
        return help_text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if any(line[:1].isspace() for line in block.splitlines()):
                blocks.append(textwrap.indent(block, indent))
            else:
                blocks.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                            subsequent_indent=indent, break_on_hyphens=False))
        return "\n\n".join(blocks)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never split option names and paths at their hyphens (--model-settings, per-layer).
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _text_width() -> int:
    """argparse's line width: the terminal's, less a margin (kept between 60 and 120)."""
    return max(60, min(120, shutil.get_terminal_size().columns - 2))


def _two_columns(rows: dict[str, str], width: int) -> list[str]:
    """``  name  text`` lines, the text wrapped under its own column."""
    column = max(len(name) for name in rows) + 4
    return [
        textwrap.fill(text or "", width, initial_indent=f"  {name:<{column - 2}}", subsequent_indent=" " * column,
                      break_on_hyphens=False)
        for name, text in rows.items()
    ]


def settings_epilog(command: str) -> str | None:
    """The keys of a command's JSON option, and where the rules build it from (None for other commands)."""
    if command not in SETTINGS_JSON:
        return None
    option, what, built_by, keys = SETTINGS_JSON[command]
    lines = "\n".join(_two_columns(keys, _text_width()))
    return f"{option} is JSON: {what}, built by the Snakemake rules {built_by}. Keys:\n\n{lines}"


def command_listing(one_line: dict[str, str]) -> str:
    """The commands by group, one per line with its one-line help, wrapped under a fixed name column."""
    listed = [name for names in COMMAND_GROUPS.values() for name in names]
    groups = {title: [n for n in names if n in one_line] for title, names in COMMAND_GROUPS.items()}
    groups["Other"] = [name for name in one_line if name not in listed]
    # One name column for all groups, so that the lists line up.
    pad = max(len(name) for name in one_line)
    blocks = []
    for title, names in groups.items():
        if names:
            rows = {name.ljust(pad): one_line[name] for name in names}
            blocks.append("\n".join([f"{title}:", *_two_columns(rows, _text_width())]))
    return "\n\n".join(blocks)


def finish_commands(parser: argparse.ArgumentParser, commands: argparse._SubParsersAction) -> None:
    """Descriptions, shared option help, JSON epilogs and the formatter for every registered subcommand,
    and the grouped list of commands in the main help (in place of argparse's flat list)."""
    one_line = {choice.dest: choice.help for choice in commands._choices_actions}
    commands._choices_actions = []  # listed by group in the epilog instead
    commands.help = "the stage to run: one of the commands below"
    parser.epilog = command_listing(one_line) + "\n\n" + (parser.epilog or "")
    for name, command in commands.choices.items():
        command.formatter_class = HelpFormatter
        if not command.description and one_line.get(name):
            text = one_line[name]
            command.description = text[:1].upper() + text[1:] + "."
        if command.epilog is None:
            command.epilog = settings_epilog(name)
        for action in command._actions:
            if not action.help and action.option_strings:
                action.help = SHARED_OPTION_HELP.get(action.option_strings[0])
