"""The pipeline's Markdown tables as standalone HTML pages, for `snakemake --report`.

The report shows HTML inline but offers CSV and Markdown files only as downloads, so each table's Markdown
(title, settings and provenance line, notes, table) is rendered to a page. Only what the table writers emit
is understood: `#` headings, paragraphs with `code` and **bold**, and pipe tables (pandas' `to_markdown`).
"""

from __future__ import annotations

import html
import re

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
p { max-width: 60em; line-height: 1.4; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""
_ALIGN = {(True, False): "left", (False, True): "right", (True, True): "center"}


def _inline(text: str) -> str:
    """Escape ``text`` and render `code` and **bold**."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    header, separator, *body = rows
    aligns = [_ALIGN.get((cell.startswith(":"), cell.endswith(":")), "left") for cell in _cells(separator)]

    def row_html(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(
            f'<{tag} style="text-align:{align}">{_inline(cell)}</{tag}>' for cell, align in zip(cells, aligns)
        ) + "</tr>"

    lines = ["<table>", "<thead>", row_html(_cells(header), "th"), "</thead>", "<tbody>"]
    lines += [row_html(_cells(row), "td") for row in body]
    return "\n".join(lines + ["</tbody>", "</table>"])


def markdown_to_html_page(markdown: str, title: str) -> str:
    """A standalone HTML page of a table writer's Markdown."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            start = i
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                i += 1
            rows = lines[start:i]
            blocks.append(_table(rows) if len(rows) >= 2 else f"<p>{_inline(rows[0])}</p>")
        else:
            start = i
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "#")):
                i += 1
            blocks.append("<p>" + _inline(" ".join(part.strip() for part in lines[start:i])) + "</p>")
    body = "\n".join(blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def run_info_page(config: dict, record: dict) -> str:
    """The report's page on the run itself: the commit and code that ran, and the whole config used."""
    import yaml

    commit = record.get("commit")
    if commit is None:
        where = "not a git checkout (an installed copy)"
    else:
        where = f"<code>{html.escape(commit)}</code>" + (
            " <strong>with uncommitted changes to the package's source (dirty)</strong>" if record.get("dirty") else ""
        )
    facts = [
        ("commit", where),
        ("package version", f"<code>{html.escape(str(record.get('package_version')))}</code>"),
        ("code fingerprint (whole package)", f"<code>{html.escape(str(record.get('code_fingerprint')))}</code>"),
    ]
    rows = "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    config_yaml = html.escape(yaml.safe_dump(config, sort_keys=False))
    body = (
        "<h1>This run</h1>\n"
        "<p>The code and the configuration of the last <code>snakemake</code> run that built this page. Each table "
        "also states, in its header line, the settings and code that produced it.</p>\n"
        f"<table>\n{rows}\n</table>\n<h2>Configuration (after defaults)</h2>\n<pre>{config_yaml}</pre>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>This run</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
