"""`seg4diff-repro download` and `seg4diff-repro prepare-dataset`: the dataset subcommands.

``cli.py`` calls :func:`add_dataset_commands` on its subparsers; each subcommand sets ``handler``.
Errors the user can act on (missing archive, checksum mismatch, login needed, bad label value) are
printed as one clear message and exit with status 1 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from seg4diff_repro.datasets import sources

log = logging.getLogger("seg4diff_repro.datasets")


def _checksum_arg(text: str) -> tuple[str, str]:
    try:
        return sources.parse_checksum(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _keyed_checksum_arg(text: str) -> tuple[str, tuple[str, str]]:
    key, sep, value = text.partition("=")
    if not sep or key not in sources.ARCHIVES:
        raise argparse.ArgumentTypeError(f"expected KEY=ALGO:HEX with KEY one of {sorted(sources.ARCHIVES)}, got {text!r}")
    return key, _checksum_arg(value)


def _user_errors():
    from seg4diff_repro.datasets.download import ArchiveError, DownloadError, UnsafeArchiveError
    from seg4diff_repro.datasets.prepare import PrepareError

    return (DownloadError, ArchiveError, UnsafeArchiveError, PrepareError)


def _run(func, args: argparse.Namespace) -> None:
    try:
        func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def _download(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.download import DownloadError, LoginRequiredError, download, verify_file

    archive = sources.ARCHIVES[args.archive]
    dest = Path(args.dest) if args.dest else Path(args.downloads_dir) / archive.filename
    checksum = args.checksum if args.checksum is not None else archive.checksum
    if archive.login_required and not args.url:
        if not dest.is_file():
            raise LoginRequiredError(f"{dest} is missing.\n" + archive.instructions.format(downloads_dir=dest.parent))
        algo, digest = verify_file(dest, checksum, origin=dest)
        if checksum is None:
            log.warning(
                "%s: no checksum is published for %s; recorded the %s of the file you placed, %s (pin it with "
                "data.source_overrides.%s.checksum)", dest, archive.key, algo, digest, archive.key,
            )
        else:
            log.info("%s is present and verified (%s %s)", dest, algo, digest)
        return
    try:
        download(
            args.url or list(archive.urls),
            dest,
            checksum,
            retries=args.retries,
            backoff=args.backoff,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
    except DownloadError as err:
        if not archive.instructions or type(err) is not DownloadError:  # a checksum mismatch says what to do
            raise
        raise DownloadError(f"{err}\n" + archive.instructions.format(downloads_dir=dest.parent)) from err


def _prepare(args: argparse.Namespace) -> None:
    from seg4diff_repro.datasets.prepare import prepare_dataset

    name = sources.resolve_name(args.name)
    out = Path(args.out) if args.out else Path(args.data_root) / "prepared" / name
    if args.source_dir:
        kwargs = {"source_dir": args.source_dir}
    else:
        kwargs = {"downloads_dir": args.downloads_dir or Path(args.data_root) / "downloads"}
    prepare_dataset(
        name,
        out,
        expected_count=args.expected_count,
        checksums=dict(args.checksum or []),
        keep_extracted=args.keep_extracted,
        progress=not args.no_progress,
        **kwargs,
    )


def add_dataset_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``download`` and ``prepare-dataset`` subcommands (each sets ``handler``)."""
    cmd = subparsers.add_parser(
        "download",
        help="download one dataset archive (resumable, retried, checksum-verified)",
        description="Download one archive of sources.ARCHIVES to --dest (or --downloads-dir/<published name>). "
        "A file that already verifies is not fetched again; login-only archives (Cityscapes) are only "
        "checked, with instructions if missing.",
    )
    cmd.add_argument("--archive", required=True, choices=sorted(sources.ARCHIVES), metavar="KEY",
                     help="archive key: %(choices)s")
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--dest", help="output file path")
    where.add_argument("--downloads-dir", help="folder; the file keeps its published name")
    cmd.add_argument("--url", action="append", help="URL to use instead of the published ones (repeatable: mirrors)")
    cmd.add_argument("--checksum", type=_checksum_arg, help="ALGO:HEX replacing the published checksum")
    cmd.add_argument("--retries", type=int, default=5, help="retries without progress per URL")
    cmd.add_argument("--backoff", type=float, default=2.0, help="first retry delay in s, doubled each time")
    cmd.add_argument("--timeout", type=float, default=60.0, help="socket timeout in s")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(handler=lambda args: _run(_download, args))

    cmd = subparsers.add_parser(
        "prepare-dataset",
        help="extract and convert one dataset into the common prepared layout",
        description="Verify the dataset's archives, extract the needed members safely and write "
        "<data-root>/prepared/<name>/ (images, label PNGs, split, classes.json, manifest.json last).",
    )
    cmd.add_argument("--name", required=True, choices=sorted([*sources.DATASETS, *sources.ALIASES]),
                     help="dataset (or alias) to prepare: %(choices)s")
    cmd.add_argument("--data-root", default="data", help="data.root of the config")
    cmd.add_argument("--out", help="prepared folder (default: <data-root>/prepared/<name>)")
    src = cmd.add_mutually_exclusive_group()
    src.add_argument("--downloads-dir", help="folder with the archives (default: <data-root>/downloads)")
    src.add_argument("--source-dir", help="existing raw copy (data.paths.<name>); nothing is extracted")
    cmd.add_argument(
        "--expected-count",
        type=int,
        help="image count the split must have, replacing the published one (the check always runs)",
    )
    cmd.add_argument(
        "--checksum",
        type=_keyed_checksum_arg,
        action="append",
        metavar="KEY=ALGO:HEX",
        help="replace the published checksum of one archive (repeatable)",
    )
    cmd.add_argument("--keep-extracted", action="store_true", help="keep the temporary extraction folder")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(handler=lambda args: _run(_prepare, args))


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry (``python -m seg4diff_repro.cli_datasets``), used when cli.py is not wired yet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="seg4diff-repro")
    add_dataset_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
