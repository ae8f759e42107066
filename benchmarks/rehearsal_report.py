"""Summarise a rehearsal (benchmarks/rehearsal.sh) from what its GPU calls brought back: the Snakemake log of
each call, the per-job benchmark TSVs, nvidia-smi's memory samples. Writes summary.md and rule_timings.tsv.

    python benchmarks/rehearsal_report.py --logs call1/snakemake.log call2/snakemake.log \
        --benchmarks results/benchmarks --gpu-memory call1/gpu_memory.csv call2/gpu_memory.csv \
        --setup call1/setup.log --env call1/env.txt --out benchmarks/results/rehearsal
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
from collections import Counter
from pathlib import Path

FINISHED = re.compile(r"Finished jobid: \d+ \(Rule: (\w+)\)")
STEPS = re.compile(r"(\d+) of (\d+) steps")
ELAPSED = re.compile(r"Elapsed time: (\d+):(\d\d):(\d\d)")
EXIT = re.compile(r"snakemake exit (\d+) at (\d+) s")
SETUP_DONE = re.compile(r"setup done at (\d+) s")


def call_summary(log: Path) -> dict:
    text = log.read_text(errors="replace")
    steps = STEPS.findall(text)
    elapsed = ELAPSED.search(text)
    ended = EXIT.search(text)
    failed = sorted(set(re.findall(r"Error in rule (\w+):", text)))
    killed = text.count("died with <Signals.SIGTERM") + text.count("died with <Signals.SIGKILL")
    return {
        "rules": Counter(FINISHED.findall(text)),
        "done": int(steps[-1][0]) if steps else 0,
        "planned": int(steps[-1][1]) if steps else 0,
        "seconds": (int(elapsed[1]) * 3600 + int(elapsed[2]) * 60 + int(elapsed[3])) if elapsed else None,
        "exit": int(ended[1]) if ended else None,
        "failed_rules": failed,
        "killed_at_deadline": killed,
    }


def timings(benchmarks: Path) -> list[list[str]]:
    """Every job's benchmark row with its rule and job name, as Snakemake's `benchmark:` files hold them."""
    rows: list[list[str]] = []
    header: list[str] | None = None
    for path in sorted(benchmarks.rglob("*.tsv")):
        relative = path.relative_to(benchmarks)
        rule = relative.parts[0].removesuffix(".tsv")
        job = relative.with_suffix("").name if len(relative.parts) > 1 else rule
        with path.open() as handle:
            table = list(csv.reader(handle, delimiter="\t"))
        if len(table) < 2:
            continue
        header = header or ["rule", "job", *table[0]]
        rows.append([rule, job, *table[1]])
    return [header, *rows] if header else []


def peak_mib(samples: list[Path]) -> int:
    peak = 0
    for path in samples:
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) == 2 and fields[1].strip().isdigit():
                peak = max(peak, int(fields[1]))
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, nargs="+", required=True, help="snakemake.log of each call, in order")
    parser.add_argument("--benchmarks", type=Path, required=True, help="the rehearsal's results/benchmarks folder")
    parser.add_argument("--gpu-memory", type=Path, nargs="+", default=[], help="nvidia-smi samples of each call")
    parser.add_argument("--setup", type=Path, help="setup.log of the call that wrote the pipelines")
    parser.add_argument("--env", type=Path, help="env.txt (GPU, driver, package versions)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    calls = [call_summary(log) for log in args.logs]
    table = timings(args.benchmarks)
    with (args.out / "rule_timings.tsv").open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t", lineterminator="\n").writerows(table)
    memory = args.out / "gpu_memory_mib.csv"
    with memory.open("w") as handle:
        handle.write("timestamp,memory_used_mib\n")
        for path in args.gpu_memory:
            handle.write(path.read_text())
    if args.env:
        shutil.copyfile(args.env, args.out / "env.txt")

    lines = ["# Rehearsal of the paper run at real size: Snakemake log summary", ""]
    if args.setup:
        setup = SETUP_DONE.search(args.setup.read_text())
        lines.append(f"setup (random-weight pipelines written with save_pretrained, raw dataset copies): "
                     f"{setup[1] if setup else '?'} s, not part of the run")
    total_s = 0
    for number, call in enumerate(calls, 1):
        total_s += call["seconds"] or 0
        how = ("every job finished" if call["exit"] == 0 else
               f"ended by the call's deadline (exit {call['exit']}); the {call['killed_at_deadline']} errors in its "
               f"log are jobs stopped at the deadline ({', '.join(call['failed_rules'])})")
        lines.append(f"call {number}: {call['done']} of {call['planned']} planned jobs in {call['seconds']} s of "
                     f"Snakemake; {how}")
    lines += [f"Snakemake time over all calls: {total_s} s ({total_s / 60:.1f} min)",
              f"peak GPU memory (whole device, nvidia-smi every 0.5 s): {peak_mib(args.gpu_memory)} MiB", ""]
    for number, call in enumerate(calls, 1):
        lines.append(f"Jobs finished in call {number}, per rule:")
        lines += [f"- {rule}: {count}" for rule, count in sorted(call["rules"].items())]
        lines.append("")
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
