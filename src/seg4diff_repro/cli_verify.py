"""Subcommands of `seg4diff-repro` for reviewers: `bundle` packs a run, `verify` checks a bundle.

``add_verify_commands(subparsers)`` registers them on the main parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _bundle(args: argparse.Namespace) -> None:
    from seg4diff_repro.verify.bundle import make_bundle

    config = json.loads(args.config) if args.config else {}
    make_bundle(
        Path(args.workdir), args.targets, Path(args.out), config, leave_out_caches=args.leave_out_caches,
        dataset_limit_mb=args.dataset_limit_mb,
    )


def _default_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _verify(args: argparse.Namespace) -> None:
    from seg4diff_repro.verify.report import write_reports
    from seg4diff_repro.verify.verify import verify_bundle

    verification = verify_bundle(
        Path(args.bundle), data_root=Path(args.data_root) if args.data_root else None, spot_check=args.spot_check,
        spot_seed=args.spot_seed, device=_default_device(args.device), model_root=Path(args.model_root),
    )
    write_reports(
        verification, Path(args.markdown) if args.markdown else None, Path(args.html) if args.html else None,
        Path(args.json) if args.json else None,
    )
    for check in verification.failures[: args.show_failures]:
        log.error("%s: %s: bundled %s, re-derived %s, tolerance %s %s", check.file, check.item, check.bundled,
                  check.rederived, check.tolerance, check.note)
    for line in verification.skipped:
        log.warning("%s", line)
    print(verification.verdict())
    if not verification.passed:
        sys.exit(1)


def add_verify_commands(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("bundle", help="pack a run's outputs and what is needed to check them")
    command.add_argument("--targets", nargs="+", required=True, help="the run's tables and figures (paths in --workdir)")
    command.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    command.add_argument("--workdir", default=".", help="the workflow folder of the run (holds .snakemake/)")
    command.add_argument("--config", default="", help="JSON of the config the run used")
    command.add_argument("--leave-out-caches", choices=["none", "figure-only", "all"], default="none",
                         help="leave out the per-image files of attention caches no table needs, or of all caches")
    command.add_argument("--dataset-limit-mb", type=float, default=200.0,
                         help="copy prepared datasets up to this size; larger ones are recorded by fingerprint")
    command.set_defaults(handler=_bundle)

    command = commands.add_parser("verify", help="check a bundle: checksums, caches, every number re-derived")
    command.add_argument("bundle", help="bundle folder (written by `seg4diff-repro bundle`)")
    command.add_argument("--markdown", help="verification report (Markdown)")
    command.add_argument("--html", help="verification report (HTML)")
    command.add_argument("--json", help="every check as JSON")
    command.add_argument("--data-root", help="folder holding the prepared datasets the bundle does not contain")
    command.add_argument("--spot-check", type=int, default=0, metavar="K",
                         help="re-extract K seeded random images of every cache and compare the maps (0: none)")
    command.add_argument("--spot-seed", type=int, default=0, help="seed of the spot check's sample")
    command.add_argument("--device", default="auto", help="device of the spot check (auto: cuda if present)")
    command.add_argument("--model-root", default=".", help="folder that relative model sources resolve against")
    command.add_argument("--show-failures", type=int, default=20, help="failures to print to the log")
    command.set_defaults(handler=_verify)
