"""Toy-world subcommands of `seg4diff-repro`: train the tiny SD3 model and draw its generations.

``add_toy_commands(subparsers)`` registers them on the main parser; ``python -m seg4diff_repro.cli_toy``
runs them on their own (the GPU training script uses that, so it needs nothing else of the CLI).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from seg4diff_repro.models.tiny_sizes import TOY_WORLD_SD3_CONFIG


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _trained_sizes(sizes: str, attention_heads: int | None):
    """The sizes of a toy model to train: the committed toy-shapes model's, or the harder toy world's (issue 16)."""
    from seg4diff_repro.models.train_toy import TOY_TRAINED_CONFIG

    config = TOY_TRAINED_CONFIG if sizes == "toy_shapes" else TOY_WORLD_SD3_CONFIG
    if attention_heads is None:
        return config
    return replace(config, num_attention_heads=attention_heads,
                   caption_projection_dim=attention_heads * config.attention_head_dim)


def _train_toy_model(args: argparse.Namespace) -> None:
    from seg4diff_repro.models.train_toy import train_toy_model

    start = time.monotonic()
    device = _resolve_device(args.device)
    record = train_toy_model(
        Path(args.dataset_root),
        Path(args.out),
        vae_steps=args.vae_steps,
        transformer_steps=args.transformer_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vae_lr=args.vae_lr,
        vae_batch_size=args.vae_batch_size,
        seed=args.seed,
        device=device,
        log_every=args.log_every,
        caption_dropout=args.caption_dropout,
        names_prob=args.names_prob,
        train_text_encoders=not args.freeze_text_encoders,
        limit=args.limit,
        max_wall_s=args.max_wall_s,
        config=_trained_sizes(args.sizes, args.attention_heads),
        init_from=args.init_from,
        compile_transformer=args.compile,
        align_layer=args.align_layer,
        align_weight=args.align_weight,
    )
    losses = record["final_losses"]
    logging.getLogger(__name__).info(
        "toy model written to %s on %s in %.0f s: VAE PSNR %.1f dB, transformer fixed-batch loss %.4f -> %.4f, "
        "steps %s, %.1f MB",
        args.out, record["device_name"], time.monotonic() - start, losses["vae_psnr_db"],
        losses["transformer_fixed_batch_before"], losses["transformer_fixed_batch_after_ema"],
        record["steps"], record["folder_mb"],
    )
    print(json.dumps({k: record[k] for k in ("steps", "final_losses", "wall_time_s", "device_name", "folder_mb")}))


def _toy_generations(args: argparse.Namespace) -> None:
    import torch

    from seg4diff_repro.generation.toy_samples import (
        generate_toy_samples,
        write_toy_generations_csv,
        write_toy_generations_figure,
    )
    from seg4diff_repro.models.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(args.model, torch.float32).to(_resolve_device(args.device))
    records = generate_toy_samples(
        pipe,
        Path(args.dataset_root),
        split=args.split,
        n=args.n,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    if args.csv:
        write_toy_generations_csv(records, Path(args.csv))
    write_toy_generations_figure(records, Path(args.png), Path(args.pdf), model_name=Path(args.model).name)
    n_ok = sum(r.colour_ok for r in records)
    logging.getLogger(__name__).info("toy generations: colour matches the prompt in %d of %d images", n_ok, len(records))


def add_toy_commands(subparsers) -> None:
    """Register `train-toy-model` and `toy-generations` on an argparse subparsers object."""
    command = subparsers.add_parser(
        "train-toy-model", help="train the toy world's tiny SD3 pipeline (VAE, then transformer) and save it"
    )
    command.add_argument("--dataset-root", required=True, help="prepared toy-shapes folder; its train split is used")
    command.add_argument("--out", required=True, help="model folder to write (save_pretrained, float16)")
    command.add_argument("--vae-steps", type=int, default=2000, help="VAE training steps (0 keeps it untrained)")
    command.add_argument("--transformer-steps", type=int, default=5000, help="transformer training steps")
    command.add_argument("--batch-size", type=int, default=256, help="transformer batch size")
    command.add_argument("--vae-batch-size", type=int, default=128, help="VAE batch size")
    command.add_argument("--lr", type=float, default=5e-4, help="transformer peak learning rate")
    command.add_argument("--vae-lr", type=float, default=1e-3, help="VAE learning rate")
    command.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise")
    command.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    command.add_argument("--log-every", type=int, default=100, help="log the losses every N steps")
    command.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)")
    command.add_argument("--names-prob", type=float, default=0.3, help="share of class-name-only prompts")
    command.add_argument(
        "--freeze-text-encoders", action="store_true", help="keep the CLIP encoders at their random weights"
    )
    command.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    command.add_argument("--max-wall-s", type=float, default=None, help="safety cap on the training time")
    command.add_argument("--compile", action="store_true", help="train through torch.compile (faster on a GPU)")
    command.add_argument("--align-layer", type=int, default=None,
                         help="joint layer whose image->text scores are trained against the labels (default: none)")
    command.add_argument("--align-weight", type=float, default=0.5, help="weight of that alignment loss")
    command.add_argument("--init-from", default=None,
                         help="continue from this trained toy model folder (its seg4diff_model.json is kept on record)")
    command.add_argument("--sizes", choices=["toy_shapes", "toy_world"], default="toy_shapes",
                         help="the committed toy-shapes model's sizes, or the harder toy world's (12 blocks, 32 x 32 "
                         "token maps)")
    command.add_argument("--attention-heads", type=int, default=None,
                         help="heads of the transformer (its width: heads x attention_head_dim); default: the sizes'")
    command.set_defaults(handler=_train_toy_model)

    command = subparsers.add_parser(
        "toy-generations", help="figure of images generated from toy-shapes val captions, with a colour check"
    )
    command.add_argument("--model", required=True, help="pipeline folder (or hub id)")
    command.add_argument("--dataset-root", required=True)
    command.add_argument("--split", default="val", help="split whose captions are drawn")
    command.add_argument("--n", type=int, default=8, help="number of val images (columns)")
    command.add_argument("--seed", type=int, default=0, help="image i of the split is generated with seed + i")
    command.add_argument("--steps", type=int, default=28, help="sampling steps")
    command.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance scale")
    command.add_argument("--device", default="cpu")
    command.add_argument("--png", required=True)
    command.add_argument("--pdf", required=True)
    command.add_argument("--csv", default=None, help="also write one row per generated image")
    command.set_defaults(handler=_toy_generations)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="seg4diff-repro (toy commands)", description=__doc__.splitlines()[0])
    add_toy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
