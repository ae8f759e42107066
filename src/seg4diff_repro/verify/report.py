"""The verification report: every checked number (bundled, re-derived, paper, difference, tolerance, pass or
fail) in Markdown and HTML, headed by the one-line verdict and what the bundle says about its run."""

from __future__ import annotations

import html
import json
from pathlib import Path

from seg4diff_repro.atomic import atomic_write_text
from seg4diff_repro.verify.compare import Check
from seg4diff_repro.verify.verify import Verification

COLUMNS = ("file", "item", "bundled", "re-derived", "paper", "difference", "tolerance", "status", "note")


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cells(check: Check) -> list[str]:
    return [check.file, check.item, _format(check.bundled), _format(check.rederived), _format(check.paper),
            _format(check.difference), check.tolerance, check.status, check.note]


def _run_lines(verification: Verification) -> list[str]:
    manifest = verification.manifest
    git, machine = manifest.get("provenance", {}), manifest.get("machine", {})
    commit = git.get("commit") or "no git commit"
    lines = [
        f"Bundle `{verification.bundle}`, made {manifest.get('created')} from commit {commit}"
        + (" (dirty: the package differed from the commit)" if git.get("dirty") else "")
        + f", {len(manifest.get('files', {}))} files, {manifest.get('size', {}).get('bytes', 0) / 1e6:.1f} MB.",
        f"Run on: Python {machine.get('python')}, torch {machine.get('torch')}, CUDA {machine.get('cuda')}, "
        f"GPUs {machine.get('gpus') or 'none'}, driver {machine.get('nvidia_smi') or 'none'}, {machine.get('platform')}.",
    ]
    for source, entry in manifest.get("models", {}).items():
        lines.append(f"Model `{source}`: {entry.get('fingerprint') or entry.get('recorded_by_caches')}.")
    for root, entry in manifest.get("datasets", {}).items():
        lines.append(f"Dataset `{root}`: sha256 {entry['fingerprint'][:16]}…, "
                     + ("in the bundle." if entry["bundled"] else "not bundled (the reviewer prepares it)."))
    return lines


def markdown_report(verification: Verification) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = [f"# Verification of a results bundle\n\n**{verification.verdict()}**\n"]
    parts += ["\n".join(f"- {line}" for line in _run_lines(verification)), ""]
    if verification.failures:
        parts.append("## Failures\n")
        parts.append("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        parts += ["| " + " | ".join(escape(c) for c in _cells(check)) + " |" for check in verification.failures]
        parts.append("")
    if verification.skipped:
        parts.append("## Not re-derived\n")
        parts += [f"- {line}" for line in verification.skipped]
        parts.append("")
    for section, checks in verification.sections.items():
        parts.append(f"## {section}\n")
        parts.append("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        parts += ["| " + " | ".join(escape(c) for c in _cells(check)) + " |" for check in checks]
        parts.append("")
    return "\n".join(parts) + "\n"


def html_report(verification: Verification) -> str:
    colour = "#1a7f37" if verification.passed else "#cf222e"

    def table(checks: list[Check]) -> str:
        head = "".join(f"<th>{name}</th>" for name in COLUMNS)
        rows = "".join(
            "<tr" + ("" if check.passed else ' class="fail"') + ">"
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(check)) + "</tr>"
            for check in checks
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    body = [f'<h1>Verification of a results bundle</h1><p style="color:{colour};font-weight:bold">'
            f"{html.escape(verification.verdict())}</p>"]
    body.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _run_lines(verification)) + "</ul>")
    if verification.failures:
        body.append("<h2>Failures</h2>" + table(verification.failures))
    if verification.skipped:
        body.append("<h2>Not re-derived</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in verification.skipped) + "</ul>")
    for section, checks in verification.sections.items():
        body.append(f"<details{' open' if any(not c.passed for c in checks) else ''}><summary><b>{html.escape(section)}"
                    f"</b>: {len(checks)} checks, {sum(not c.passed for c in checks)} failed</summary>{table(checks)}</details>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}tr.fail td{background:#ffebe9}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Verification</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_reports(verification: Verification, markdown: Path | None, html_path: Path | None, json_path: Path | None = None) -> None:
    if markdown is not None:
        atomic_write_text(markdown, markdown_report(verification))
    if html_path is not None:
        atomic_write_text(html_path, html_report(verification))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps({
            "verdict": verification.verdict(), "passed": verification.passed, "skipped": verification.skipped,
            "checks": {section: [dict(zip(COLUMNS, _cells(c))) for c in checks]
                       for section, checks in verification.sections.items()},
        }, indent=1) + "\n")
