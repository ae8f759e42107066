"""A fresh run against committed outputs: every number of every committed table, within the re-run tolerance.

The committed toy-world tables (``paper_tables/toy/``) were made by a default run; a default run in a fresh clone
on the same kind of machine must reproduce each of their numbers. Unlike ``verify``, which re-derives tables from
a bundle's own caches (and so matches them exactly), a fresh run recomputes the forward passes too, so floats in
the tables may move by float noise (docs/verification.md states the measured differences); integers, text and
the set of rows, columns and tables must not change.
"""

from __future__ import annotations

from pathlib import Path

from seg4diff_repro.verify.compare import Check, compare_csv

# A fresh default toy run on the CI machine type changed no table cell by more than this (docs/verification.md).
RERUN_TABLE_ABS_TOL = 0.01


def compare_table_folders(committed: Path, fresh: Path, tolerance: float = RERUN_TABLE_ABS_TOL) -> list[Check]:
    """Every CSV under ``committed`` against the one of the same name under ``fresh``, cell by cell; a table
    missing from either side is a failure (the committed outputs are then stale or incomplete)."""
    committed, fresh = Path(committed), Path(fresh)
    names = sorted({path.name for path in committed.glob("*.csv")} | {path.name for path in fresh.glob("*.csv")})
    if not names:
        return [Check(str(committed), "tables", passed=False, note=f"no CSV tables in {committed} or {fresh}")]
    checks = []
    for name in names:
        label = f"paper_tables/{committed.name}/{name}"
        if not (committed / name).is_file():
            checks.append(Check(label, "table", None, "present", passed=False,
                                note=f"made by the fresh run but not committed under {committed}"))
        elif not (fresh / name).is_file():
            checks.append(Check(label, "table", "present", None, passed=False,
                                note=f"committed but not made by the fresh run in {fresh}"))
        else:
            checks.extend(compare_csv(label, committed / name, fresh / name, table_tolerance=tolerance))
    return checks


def rerun_verdict(checks: list[Check]) -> str:
    numbers = sum(isinstance(check.bundled, (int, float)) and check.tolerance not in ("", "not compared")
                  for check in checks)
    tables = len({check.file for check in checks})
    failures = [check for check in checks if not check.passed]
    if not failures:
        largest = max((abs(check.difference) for check in checks if isinstance(check.difference, (int, float))),
                      default=0.0)
        return f"PASS: {numbers} numbers in {tables} tables reproduced (largest difference {largest:g})"
    first = failures[0]
    return (f"FAIL: {len(failures)} of {len(checks)} checks in {tables} tables; first: {first.file}: {first.item}: "
            f"committed {first.bundled}, fresh {first.rederived}, tolerance {first.tolerance} {first.note}".rstrip())


def rerun_markdown(committed: Path, fresh: Path, checks: list[Check]) -> str:
    """The verdict, then each failing cell, then each table with its largest difference."""
    lines = ["# Fresh run against committed outputs\n", f"**{rerun_verdict(checks)}**\n",
             f"Committed: `{committed}`; fresh: `{fresh}`.\n"]
    failures = [check for check in checks if not check.passed]
    if failures:
        lines += ["## Failures\n", "| table | cell | committed | fresh | difference | tolerance | note |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c.file} | {c.item} | {c.bundled} | {c.rederived} | {c.difference} | {c.tolerance} | {c.note} |"
                  for c in failures]
        lines.append("")
    lines += ["## Tables\n", "| table | cells | largest difference | status |", "|---|---:|---:|---|"]
    for table in sorted({check.file for check in checks}):
        mine = [check for check in checks if check.file == table]
        largest = max((abs(c.difference) for c in mine if isinstance(c.difference, (int, float))), default=0.0)
        lines.append(f"| {table} | {len(mine)} | {largest:g} | {'pass' if all(c.passed for c in mine) else 'FAIL'} |")
    return "\n".join(lines) + "\n"
