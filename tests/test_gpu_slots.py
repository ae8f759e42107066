"""GPU slots: each GPU job of a host gets a GPU of its own, a killed job frees its GPU, and under Snakemake with
`--resources gpu=2` two jobs run at once on two different GPUs and never two on one (GPUs named, none needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from seg4diff_repro import gpu_slots
from seg4diff_repro.gpu_slots import claim_gpu, release_gpu, visible_gpus
from test_workflow import BIN, REPO

# A process that claims a GPU as a command does, prints the GPU it got, then holds it until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from seg4diff_repro.gpu_slots import claim_gpu
    import os
    device = claim_gpu(sys.argv[1], lock_dir=sys.argv[2], gpus=["0", "1"], poll_s=0.05)
    print(device, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(600)
""")


@pytest.fixture(autouse=True)
def no_claim_left():
    yield
    release_gpu()


def holder(device: str, lock_dir: Path, **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra_env}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-c", HOLDER, device, str(lock_dir)], env=env, stdout=subprocess.PIPE,
                            text=True)


def first_line(process: subprocess.Popen, timeout: float = 60) -> str:
    """The process's first output line, or '' if it printed nothing within `timeout` (it is waiting)."""
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            return line.strip()
        time.sleep(0.05)
    return ""


def test_two_jobs_get_two_gpus_and_a_third_waits_until_a_killed_one_frees_its_gpu(tmp_path):
    first, second = holder("cuda", tmp_path), None
    processes = [first]
    try:
        assert first_line(first) == "cuda 0"
        second = holder("cuda", tmp_path)
        processes.append(second)
        assert first_line(second) == "cuda 1"
        third = holder("cuda", tmp_path)
        processes.append(third)
        assert first_line(third, timeout=3) == ""  # both GPUs taken: it waits
        first.send_signal(signal.SIGKILL)  # no clean-up runs; the OS drops the lock
        first.wait()
        assert first_line(third) == "cuda 0"
        note = json.loads((tmp_path / "gpu0.lock").read_text())
        assert note["pid"] == third.pid and note["gpu"] == "0"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_jobs_per_gpu_fills_every_gpu_once_before_sharing_and_then_waits(tmp_path):
    processes = []
    try:
        for expected in ["cuda 0", "cuda 1", "cuda 0", "cuda 1"]:
            processes.append(holder("cuda", tmp_path, SEG4DIFF_JOBS_PER_GPU="2"))
            assert first_line(processes[-1]) == expected
        processes.append(holder("cuda", tmp_path, SEG4DIFF_JOBS_PER_GPU="2"))
        assert first_line(processes[-1], timeout=3) == ""  # two jobs on each GPU: the fifth waits
        processes[2].send_signal(signal.SIGKILL)  # GPU 0's second slot frees
        processes[2].wait()
        assert first_line(processes[-1]) == "cuda 0"
        assert json.loads((tmp_path / "gpu0.slot1.lock").read_text())["pid"] == processes[-1].pid
    finally:
        for process in processes:
            process.kill()
            process.wait()
    with pytest.raises(ValueError, match="SEG4DIFF_JOBS_PER_GPU='0'"):
        claim_gpu("cuda", environ={"SEG4DIFF_JOBS_PER_GPU": "0"}, lock_dir=tmp_path, gpus=["0"])


def test_an_explicit_index_waits_for_that_gpu(tmp_path):
    holding = holder("cuda:1", tmp_path)
    try:
        assert first_line(holding) == "cuda 1"  # cuda:N becomes the N-th visible GPU, seen alone as cuda
        environ: dict[str, str] = {}
        assert claim_gpu("cuda", environ=environ, lock_dir=tmp_path, gpus=["0", "1"]) == "cuda"
        assert environ["CUDA_VISIBLE_DEVICES"] == "0"  # GPU 1 was taken
    finally:
        holding.kill()
        holding.wait()


def test_devices_that_claim_nothing(tmp_path):
    environ: dict[str, str] = {}
    assert claim_gpu("cpu", environ=environ, lock_dir=tmp_path, gpus=["0"]) == "cpu"
    assert claim_gpu("cuda", environ=environ, lock_dir=tmp_path, gpus=[]) == "cuda"  # torch will say no CUDA
    assert claim_gpu("auto", environ=environ, lock_dir=tmp_path, gpus=[]) == "cpu"
    slurm = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3"}
    assert claim_gpu("cuda", environ=slurm, lock_dir=tmp_path, gpus=["0"]) == "cuda"
    assert slurm["CUDA_VISIBLE_DEVICES"] == "3"  # SLURM's assignment stands
    off = {"SEG4DIFF_GPU_SLOTS": "off"}
    assert claim_gpu("cuda:1", environ=off, lock_dir=tmp_path, gpus=["0", "1"]) == "cuda:1"
    assert environ == {} and "CUDA_VISIBLE_DEVICES" not in off
    assert list(tmp_path.iterdir()) == []  # no lock was taken
    with pytest.raises(ValueError, match=r"shows 2 GPU\(s\).*cuda:0\.\.cuda:1"):
        claim_gpu("cuda:2", environ={}, lock_dir=tmp_path, gpus=["0", "1"])


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_slots.default_lock_dir({"SEG4DIFF_GPU_LOCK_DIR": "/x/y"}) == Path("/x/y")


SNAKEFILE = """
rule all:
    input: expand("done/{i}.json", i=range(6))

rule gpu_job:
    output: "done/{i}.json"
    resources: gpu=1
    shell: "{PYTHON} job.py {output}"
"""

# Claims a GPU of two pretend GPUs as a command does, records when it held which, and works for a while.
JOB = """
import json, os, sys, time
from seg4diff_repro.gpu_slots import claim_gpu
claim_gpu("cuda", poll_s=0.05)
start = time.time()
time.sleep(1.5)
json.dump({"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("gpus", [2, 1, None])
def test_snakemake_runs_n_gpu_jobs_at_once_each_on_its_own_gpu(tmp_path, gpus):
    """None: no --resources, so Snakemake starts all six jobs at once; the slots still keep one job per GPU."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE.replace("{PYTHON}", sys.executable))
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
           "CUDA_VISIBLE_DEVICES": "0,1"}
    env.pop("SLURM_JOB_ID", None)
    limit = [] if gpus is None else ["--resources", f"gpu={gpus}"]
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "6", *limit],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [json.loads(path.read_text()) for path in sorted((tmp_path / "done").glob("*.json"))]
    overlapping = [(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert all(a["gpu"] != b["gpu"] for a, b in overlapping)  # never two jobs on one GPU at once
    if gpus != 1:
        assert {job["gpu"] for job in jobs} == {"0", "1"} and overlapping  # both GPUs, in parallel
    else:
        assert not overlapping and {job["gpu"] for job in jobs} == {"0"}
    assert (tmp_path / ".snakemake/gpu_slots").is_dir()  # the locks live in the workflow's .snakemake/
