"""`seg4diff-repro` commands that build the pages of `snakemake --report`: tables and the run's provenance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _table_page(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.tables.html import markdown_to_html_page

    markdown = Path(args.markdown)
    page = markdown_to_html_page(markdown.read_text(), title=markdown.stem)
    atomic_write_bytes(Path(args.html), page.encode())


def _run_info(args: argparse.Namespace) -> None:
    from seg4diff_repro.atomic import atomic_write_bytes
    from seg4diff_repro.provenance import provenance
    from seg4diff_repro.tables.html import run_info_page

    page = run_info_page(json.loads(args.config), provenance())
    atomic_write_bytes(Path(args.html), page.encode())


def add_report_commands(subparsers) -> None:
    table = subparsers.add_parser(
        "table-page", help="Render a table's Markdown (title, settings and provenance, notes) as an HTML page."
    )
    table.add_argument("--markdown", required=True, help="the table's .md file")
    table.add_argument("--html", required=True, help="the page to write")
    table.set_defaults(handler=_table_page)
    info = subparsers.add_parser(
        "run-info", help="Write the report's page on the run: commit, dirty flag, code fingerprint, config."
    )
    info.add_argument("--config", required=True, help="the workflow's config, as JSON")
    info.add_argument("--html", required=True, help="the page to write")
    info.set_defaults(handler=_run_info)
