"""What Snakemake recorded about the jobs of a run: for each output, the rule, its inputs and its shell command.

Snakemake keeps one JSON record per output file under ``.snakemake/metadata/`` (file name: the urlsafe
base64 of the output path, split into folders prefixed ``@`` when longer than a file name may be). The
bundle reads these records to know, for every table and figure, the exact command that made it and the
files it read, so that verification re-runs the very same commands rather than a re-implementation.
"""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from seg4diff_repro.verify.layout import command_of

METADATA = Path(".snakemake") / "metadata"
# Snakemake's record layout this reader understands (the `record_format_version` field).
KNOWN_RECORD_FORMATS = (5, 6)
SHELL_OPERATORS = {">", "2>", ">>", "2>>", "2>&1", "&>", ";", "&&", "||", "|"}


@dataclass
class Job:
    """One Snakemake job of the run: its rule, shell command, inputs and outputs."""

    rule: str
    shellcmd: str
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)

    @property
    def command(self) -> str | None:
        return command_of(self.shellcmd)

    def argv(self) -> list[str]:
        """The `seg4diff-repro` arguments of the shell command, without redirections (``2> log``)."""
        tokens = shlex.split(self.shellcmd)
        start = tokens.index("seg4diff-repro")
        end = next((i for i in range(start, len(tokens)) if tokens[i] in SHELL_OPERATORS), len(tokens))
        return tokens[start + 1 : end]


def _decode(relative: Path) -> str:
    return base64.urlsafe_b64decode("".join(part.lstrip("@") for part in relative.parts)).decode()


def read_jobs(workdir: Path) -> dict[str, Job]:
    """Every output path (relative to ``workdir``) that Snakemake has a record for, mapped to its job.

    Outputs of one job share one `Job` (same rule and shell command).
    """
    root = Path(workdir) / METADATA
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: the bundle needs the records of a Snakemake run in {workdir}; "
            "run the pipeline there with snakemake first"
        )
    jobs: dict[tuple[str, str], Job] = {}
    by_output: dict[str, Job] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            output = _decode(path.relative_to(root))
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue  # not a record (an editor's or the OS's file)
        if record.get("record_format_version") not in KNOWN_RECORD_FORMATS:
            raise ValueError(
                f"{path}: Snakemake record format {record.get('record_format_version')!r} is not one of "
                f"{KNOWN_RECORD_FORMATS}; the bundle reader needs updating for this Snakemake version"
            )
        if record.get("incomplete"):
            continue
        shellcmd = record.get("shellcmd") or ""
        job = jobs.setdefault((record["rule"], shellcmd), Job(record["rule"], shellcmd, list(record.get("input", []))))
        job.outputs.append(output)
        by_output[output] = job
    return by_output
