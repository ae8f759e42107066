"""Summarise a benchmarks/multi_gpu.sh run from the files it leaves: its log and the nvidia-smi samples.

    python benchmarks/multi_gpu_report.py benchmarks/results/multi_gpu_h200x2

Prints (and writes as summary.md beside the inputs) one row per completed run: wall time, the forward-pass jobs
that claimed a GPU slot on each GPU, the seconds in which any GPU and every GPU at once held a job's memory
(`nvidia-smi --query-gpu` samples every 0.5 s, memory above BUSY_MIB), the most compute processes seen on one
GPU in a sample of `--query-compute-apps` (1: never two jobs on one device; that query answered sparsely), then
the speed-up of each run over the gpu=1 run.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

RUN_START = re.compile(r"^\[(\d\d:\d\d:\d\d)\] run (\S+): snakemake (.*)$")
RUN_END = re.compile(r"^\[(\d\d:\d\d:\d\d)\] run (\S+): (\d+) s$")
SLOT = re.compile(r"^\[(\S+)\] \S+ (\d\d:\d\d:\d\d),\d+ \S+ INFO: GPU slot: GPU (\d+) of ")
SAMPLE_PERIOD_S = 0.5
BUSY_MIB = 100  # an idle H200 shows 0-4 MiB; a job's CUDA context alone takes several hundred


def day_seconds(timestamp: str) -> float:
    stamp = datetime.strptime(timestamp, "%Y/%m/%d %H:%M:%S.%f")
    return stamp.hour * 3600 + stamp.minute * 60 + stamp.second + stamp.microsecond / 1e6


def seconds(clock: str) -> int:
    hours, minutes, secs = map(int, clock.split(":"))
    return hours * 3600 + minutes * 60 + secs


def parse_log(path: Path) -> dict[str, dict]:
    """Each run that finished: its window (seconds of the day), wall time, command and GPU-slot claims."""
    runs: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if match := RUN_START.match(line):
            runs[match[2]] = {"start": seconds(match[1]), "command": match[3], "slots": Counter()}
        elif (match := RUN_END.match(line)) and match[2] in runs:
            runs[match[2]].update(end=seconds(match[1]), wall_s=int(match[3]))
        elif (match := SLOT.match(line)) and match[1] in runs:
            runs[match[1]]["slots"][int(match[3])] += 1
    return {name: run for name, run in runs.items() if "wall_s" in run}


def parse_apps(path: Path) -> dict[float, Counter]:
    """Compute processes per GPU (by UUID) at each nvidia-smi sample (seconds of the day)."""
    samples: dict[float, Counter] = defaultdict(Counter)
    with path.open() as handle:
        for row in csv.DictReader(handle, skipinitialspace=True):
            samples[day_seconds(row["timestamp"])][row["gpu_uuid"]] += 1
    return samples


def parse_busy(path: Path) -> tuple[list[tuple[float, set[int]]], int]:
    """The GPUs holding a job's memory at each sampling round (rounds of one row per GPU, in order), and the
    number of GPUs sampled."""
    rounds: list[tuple[float, set[int]]] = []
    gpus = 0
    with path.open() as handle:
        for row in csv.DictReader(handle, skipinitialspace=True):
            index, used = int(row["index"]), int(row["memory.used [MiB]"].split()[0])
            gpus = max(gpus, index + 1)
            if index == 0:
                rounds.append((day_seconds(row["timestamp"]), set()))
            if rounds and used > BUSY_MIB:
                rounds[-1][1].add(index)
    return rounds, gpus


def summarise(folder: Path) -> str:
    runs = parse_log(folder / "snakemake.log")
    apps = parse_apps(folder / "apps.csv")
    busy, gpus = parse_busy(folder / "nvidia_smi.csv")
    lines = ["| run | wall s | forward-pass jobs per GPU | s with a GPU busy | s with every GPU busy at once "
             "| most processes on one GPU |", "|---|---:|---|---:|---:|---:|"]
    for name, run in runs.items():
        in_run = [held for stamp, held in busy if run["start"] <= stamp <= run["end"]]
        any_busy = sum(bool(held) for held in in_run) * SAMPLE_PERIOD_S
        all_busy = sum(len(held) == gpus for held in in_run) * SAMPLE_PERIOD_S
        most = max((max(counts.values()) for stamp, counts in apps.items() if run["start"] <= stamp <= run["end"]),
                   default=0)
        per_gpu = ", ".join(f"GPU {gpu}: {count}" for gpu, count in sorted(run["slots"].items()))
        lines.append(f"| {name} | {run['wall_s']} | {per_gpu} | {any_busy:.1f} | {all_busy:.1f} | {most} |")
    if "gpu1" in runs:
        lines.append("")
        lines += [f"Speed-up of {name} over gpu1: {runs['gpu1']['wall_s'] / run['wall_s']:.2f}x"
                  for name, run in runs.items() if name != "gpu1"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder with snakemake.log and apps.csv of a multi_gpu.sh run")
    folder = parser.parse_args().folder
    text = summarise(folder)
    (folder / "summary.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
