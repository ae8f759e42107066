"""Tables for paper_tables/: our numbers beside the paper's, with provenance."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report pages import this package in envs/datasets.yaml, which has no pandas
    import pandas as pd


def heading(title: str, md_path: Path | str) -> str:
    """The Markdown heading of a table written to ``md_path``: the title, and which outputs it belongs to (the folder
    under paper_tables/, as figures name theirs in their footer), so a toy table is never read as a paper one."""
    folder = Path(md_path).parent
    outputs = f" ({folder.name} outputs)" if folder.parent.name == "paper_tables" else ""
    return f"# {title}{outputs}\n\n"


def markdown_body(table: pd.DataFrame) -> str:
    """A table's rows as Markdown, two decimals; missing values (the paper's, mostly) as blanks, not "nan"."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".2f", missingval="")
