"""Subcommands of `seg4diff-repro` for reviewers: `bundle` packs a run, `verify` checks a bundle,
`compare-outputs` checks a fresh run's tables against committed ones.

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


def _compare_outputs(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_text
    from seg4diff_repro.verify.rerun import RERUN_TABLE_ABS_TOL, compare_table_folders, rerun_markdown, rerun_verdict

    tolerance = RERUN_TABLE_ABS_TOL if args.tolerance is None else args.tolerance
    checks = compare_table_folders(Path(args.committed), Path(args.fresh), tolerance)
    if args.markdown:
        atomic_write_text(Path(args.markdown), rerun_markdown(Path(args.committed), Path(args.fresh), checks))
    for check in [c for c in checks if not c.passed][: args.show_failures]:
        log.error("%s: %s: committed %s, fresh %s, tolerance %s %s", check.file, check.item, check.bundled,
                  check.rederived, check.tolerance, check.note)
    print(rerun_verdict(checks))
    if not all(check.passed for check in checks):
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

    command = commands.add_parser(
        "compare-outputs", help="check a fresh run's tables against committed ones (e.g. paper_tables/toy)")
    command.add_argument("--committed", required=True, help="folder of committed tables, e.g. paper_tables/toy")
    command.add_argument("--fresh", required=True, help="the same folder of a fresh run")
    command.add_argument("--tolerance", type=float, default=None,
                         help="allowed difference of a float table cell (integers and text: exact); default: the "
                              "measured re-run tolerance, 0.01 (docs/verification.md)")
    command.add_argument("--markdown", help="report: verdict, failing cells, largest difference per table")
    command.add_argument("--show-failures", type=int, default=20, help="failures to print to the log")
    command.set_defaults(handler=_compare_outputs)
