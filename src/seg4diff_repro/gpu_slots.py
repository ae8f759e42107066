"""One GPU per job on a host with several: a lock per GPU, held for the life of the job's process.

Snakemake's ``--resources gpu=N`` only counts: it starts at most N GPU jobs at once but does not say
which GPU each one should use, so every job that opens ``cuda`` would land on GPU 0. A command asked
for ``cuda`` (or ``auto``) therefore claims a free GPU of this host first: it takes an exclusive
``flock`` on ``<lock dir>/gpu<id>.lock`` and from then on sees that GPU alone (``CUDA_VISIBLE_DEVICES``,
set before torch initialises CUDA). The operating system drops the lock when the process ends, however
it ends (exit, exception, ``kill -9``), so a failed or killed job never leaves a GPU taken. When every
GPU is taken the job waits for one, so that two jobs never share a GPU even when more GPU jobs run
than there are GPUs (``--resources gpu`` above the GPU count, or no ``--resources`` at all).

A GPU with room for several jobs (a small model on a large GPU, where each job spends most of its time
loading and importing rather than computing) can take ``$SEG4DIFF_JOBS_PER_GPU`` jobs at once: each GPU
then has that many slots, and every GPU's first slot is taken before any GPU's second.

Under SLURM the scheduler has already given the job its GPUs (``CUDA_VISIBLE_DEVICES`` set in a job
that has ``SLURM_JOB_ID``); nothing is claimed then. ``SEG4DIFF_GPU_SLOTS=off`` turns claiming off.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_DIR_VARIABLE = "SEG4DIFF_GPU_LOCK_DIR"
SWITCH_VARIABLE = "SEG4DIFF_GPU_SLOTS"
JOBS_PER_GPU_VARIABLE = "SEG4DIFF_JOBS_PER_GPU"

# The lock of the GPU this process holds: open for as long as the process lives.
_held: IO[str] | None = None
_claim: dict | None = None


def default_lock_dir(environ: MutableMapping[str, str] = os.environ) -> Path:
    """``$SEG4DIFF_GPU_LOCK_DIR``, else ``.snakemake/gpu_slots/<host>`` in the working directory (the
    workflow's, for a job): one folder per host, since GPUs belong to a host even on a shared file system."""
    if environ.get(LOCK_DIR_VARIABLE):
        return Path(environ[LOCK_DIR_VARIABLE])
    return Path(".snakemake") / "gpu_slots" / socket.gethostname()


def visible_gpus(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def jobs_per_gpu(environ: MutableMapping[str, str] = os.environ) -> int:
    """``$SEG4DIFF_JOBS_PER_GPU`` (default 1): how many jobs may share one GPU."""
    value = environ.get(JOBS_PER_GPU_VARIABLE, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{JOBS_PER_GPU_VARIABLE}={value!r}: give a whole number of jobs per GPU, 1 or more")
    return int(value)


def _lock_name(gpu: str, slot: int = 0) -> str:
    name = "gpu" + "".join(c if c.isalnum() or c in "-_" else "_" for c in gpu)
    return name + (f".slot{slot}" if slot else "") + ".lock"


def _try_lock(path: Path) -> IO[str] | None:
    handle = path.open("a+")  # not "w": truncating before the lock would erase the holder's note
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_gpu(
    device: str,
    *,
    environ: MutableMapping[str, str] = os.environ,
    lock_dir: Path | None = None,
    gpus: list[str] | None = None,
    poll_s: float = 1.0,
) -> str:
    """The device a command should open, after claiming a free GPU of this host for it.

    ``cuda`` and ``auto`` take the first free GPU; ``cuda:N`` waits for the N-th visible GPU; any other
    device (``cpu``) is returned unchanged. On a claim ``CUDA_VISIBLE_DEVICES`` in ``environ`` names the
    claimed GPU alone and the result is ``cuda``. ``auto`` without any GPU gives ``cpu``; where nothing is
    claimed (slots off, a SLURM job) the device comes back as given. Call it before torch initialises
    CUDA (the commands import torch after it).
    """
    global _held, _claim
    kind, _, index = device.partition(":")
    if kind != "cuda" and device != "auto":
        return device
    if environ.get(SWITCH_VARIABLE, "").lower() in ("off", "0", "false", "no"):
        log.info("GPU slots off (%s): using %s as given", SWITCH_VARIABLE, device)
        return device
    if environ.get("SLURM_JOB_ID") and "CUDA_VISIBLE_DEVICES" in environ:
        log.info("SLURM job %s: using the GPU(s) SLURM assigned (CUDA_VISIBLE_DEVICES=%s)",
                 environ["SLURM_JOB_ID"], environ["CUDA_VISIBLE_DEVICES"])
        return device
    if _held is not None:  # already claimed by this process
        return "cuda"
    gpus = visible_gpus(environ) if gpus is None else gpus
    if not gpus:
        if kind == "auto":
            return "cpu"
        log.warning("device %s asked for, but no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi)", device)
        return device
    if index:
        if not index.isdigit() or int(index) >= len(gpus):
            raise ValueError(f"device {device!r}: this host shows {len(gpus)} GPU(s) ({', '.join(gpus)}); "
                             f"use cuda (any free GPU) or cuda:0..cuda:{len(gpus) - 1}")
        candidates = [gpus[int(index)]]
    else:
        candidates = gpus
    slots = [(gpu, slot) for slot in range(jobs_per_gpu(environ)) for gpu in candidates]
    lock_dir = default_lock_dir(environ) if lock_dir is None else Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    waiting_logged = False
    while True:
        for gpu, slot in slots:
            lock = lock_dir / _lock_name(gpu, slot)
            handle = _try_lock(lock)
            if handle is None:
                continue
            waited = time.monotonic() - started
            _held = handle
            _claim = {"gpu": gpu, "slot": slot, "lock": str(lock), "host": socket.gethostname(),
                      "pid": os.getpid(), "waited_s": round(waited, 3)}
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({**_claim, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            handle.flush()
            environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("GPU slot: GPU %s of %s on %s (CUDA_VISIBLE_DEVICES=%s, lock %s, waited %.1f s)",
                     gpu, ",".join(gpus), _claim["host"], gpu, lock, waited)
            return "cuda"
        if not waiting_logged:
            log.info("GPU slot: every GPU of %s is taken (%s); waiting for one", ",".join(candidates), lock_dir)
            waiting_logged = True
        time.sleep(poll_s)


def release_gpu() -> None:
    """Give the claimed GPU back before the process ends (tests; a command never needs to)."""
    global _held, _claim
    if _held is not None:
        _held.close()  # closing the last descriptor drops the flock
    _held = _claim = None


def claimed_gpu() -> dict | None:
    """What this process claimed (GPU id, lock file, host, pid, seconds waited), or None."""
    return None if _claim is None else dict(_claim)


def run_record(device: str, **knobs: object) -> dict:
    """The operational settings of a run, for its manifest: they do not change the numbers, so they are
    recorded but are not part of any cache key (device, batch size, host, GPU)."""
    import torch

    record: dict = {"device": device, **knobs, "host": socket.gethostname(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_slot": claimed_gpu()}
    if device.startswith("cuda") and torch.cuda.is_available():
        record["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record
