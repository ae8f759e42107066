"""The jobs' fork server (fork_server.py): a job run there writes what it writes on its own, fails as it would,
stops when cancelled, and a job the server cannot take runs on its own."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg4diff_repro.fork_server import SERVER_ENV, _apply_thread_count, run_in_server, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a workflow job: this interpreter's `python` first on PATH, the checkout's src/ first."""
    env = dict(os.environ)
    env.pop(SERVER_ENV, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO / "src") + (f"{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    return env | extra


def wait_until(condition, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server for this test process, as the Snakefile's onstart starts one for Snakemake; its socket and log."""
    log = tmp_path_factory.mktemp("fork_server") / "fork_server.log"
    socket_path = start_server(log, parent_pid=os.getpid(), env=job_env())
    wait_until(lambda: Path(socket_path).exists())
    yield socket_path, log
    stop_server(socket_path)
    assert not Path(socket_path).exists() and not Path(socket_path).parent.exists()


def job(args: list[str], stderr: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    with open(stderr, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "seg4diff_repro", *args], env=env, stderr=err,
                                stdout=subprocess.DEVNULL, cwd=stderr.parent, **popen)


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def server_jobs(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "job process" in line and ": seg4diff-repro" in line]


def test_a_job_in_the_server_writes_what_it_writes_on_its_own(server, tmp_path):
    socket_path, log = server
    before = len(server_jobs(log))
    runs = {}
    for name, env in (("server", job_env(**{SERVER_ENV: socket_path})), ("own", job_env(**{SERVER_ENV: "off"}))):
        out = tmp_path / name / "model"
        started = time.monotonic()
        assert job(["build-tiny-model", "--out", str(out)], tmp_path / f"{name}.log", env).wait(timeout=300) == 0
        runs[name] = (tree_digest(out), time.monotonic() - started, (tmp_path / f"{name}.log").read_text())
    assert runs["server"][0] == runs["own"][0]
    assert len(server_jobs(log)) == before + 1, "the job with the server's socket ran in the server, the other not"
    assert server_jobs(log)[-1].endswith("seg4diff-repro build-tiny-model")
    # The job's stderr is its own file in both cases (diffusers' save warnings), not the server's log.
    assert "cannot be saved" in runs["server"][2] and "cannot be saved" in runs["own"][2]
    assert "cannot be saved" not in log.read_text()


def test_a_failing_job_exits_as_it_would_on_its_own(server, tmp_path):
    socket_path, _log = server
    for name, env in (("server", job_env(**{SERVER_ENV: socket_path})), ("own", job_env(**{SERVER_ENV: "off"}))):
        usage = job(["make-toy-world", "--no-such-option"], tmp_path / f"{name}_usage.log", env).wait(timeout=60)
        missing = job(["gather-attention", "--shards", str(tmp_path / "absent.json"), "--dataset-root",
                       str(tmp_path)], tmp_path / f"{name}_missing.log", env).wait(timeout=120)
        assert (usage, missing != 0) == (2, True), name
        assert "the following arguments are required: --root, --preset" in (tmp_path / f"{name}_usage.log").read_text()
    assert (tmp_path / "server_missing.log").read_text().splitlines()[-1] == \
        (tmp_path / "own_missing.log").read_text().splitlines()[-1]


def long_job(tmp_path: Path, name: str, socket_path: str) -> subprocess.Popen:
    return job(["make-toy-world", "--root", str(tmp_path / name), "--preset", "objects", "--n-train", "100000",
                "--n-val", "0", "--seed", "0", "--workers", "1"], tmp_path / f"{name}.log",
               job_env(**{SERVER_ENV: socket_path}))


def last_job_pid(log: Path) -> int:
    return int(server_jobs(log)[-1].split("job process ")[1].split(":")[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("how", ["SIGTERM to the client", "the client killed"])
def test_a_cancelled_job_stops(server, tmp_path, how):
    socket_path, log = server
    before = len(server_jobs(log))
    client = long_job(tmp_path, "cancelled", socket_path)
    wait_until(lambda: len(server_jobs(log)) > before, timeout=60)
    child = last_job_pid(log)
    assert alive(child)
    if how == "SIGTERM to the client":
        client.send_signal(signal.SIGTERM)  # what Snakemake does to a job it cancels
        assert client.wait(timeout=30) == 128 + signal.SIGTERM
    else:
        client.kill()  # no chance to pass the signal on: the child sees its connection close
        client.wait(timeout=30)
    wait_until(lambda: not alive(child), timeout=30)
    # -15 (stopped by SIGTERM), or 1 where the client was gone before the child could tell it its pid.
    wait_until(lambda: f"job process {child} ended with status" in log.read_text(), timeout=30)
    ended = log.read_text().split(f"job process {child} ended with status ")[1].split()[0]
    assert ended in ("-15", "1") and not (tmp_path / "cancelled" / "classes.json").exists()


def test_a_job_of_another_environment_runs_on_its_own(server, tmp_path):
    socket_path, log = server
    before = len(server_jobs(log))
    other = tmp_path / "other_site"
    other.mkdir()
    env = job_env(**{SERVER_ENV: socket_path})
    env["PYTHONPATH"] += os.pathsep + str(other)  # another sys.path: the server's modules are not the job's
    assert job(["build-tiny-model", "--out", str(tmp_path / "m")], tmp_path / "other.log", env).wait(timeout=300) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert len(server_jobs(log)) == before
    assert "refused build-tiny-model: the job's Python environment differs" in log.read_text()


def test_no_server_means_the_job_runs_itself(tmp_path):
    assert run_in_server(["--help"], socket_path="off") is None
    assert run_in_server(["--help"], socket_path=str(tmp_path / "no.sock")) is None
    assert run_in_server(["--help"], socket_path="") is None
    assert start_server(tmp_path / "log", parent_pid=os.getpid(), env=job_env(**{SERVER_ENV: "off"})) is None


def test_the_server_stops_with_its_snakemake_process(tmp_path):
    parent = subprocess.Popen(["sleep", "30"])
    socket_path = start_server(tmp_path / "fork_server.log", parent_pid=parent.pid, env=job_env())
    wait_until(lambda: Path(socket_path).exists())
    server_pid = int(Path(socket_path).with_name("pid").read_text())
    parent.kill()
    parent.wait()
    wait_until(lambda: not alive(server_pid), timeout=30)
    assert not Path(socket_path).parent.exists(), "the server removes its socket's folder"
    assert "stopped" in (tmp_path / "fork_server.log").read_text()


def test_gpu_jobs_run_on_their_own(server):
    socket_path, log = server
    before = len(server_jobs(log))
    for argv in (["extract-attention", "--device", "cuda"], ["generate-run", "--device=cuda:1"]):
        assert run_in_server(argv, socket_path=socket_path) is None
    assert len(server_jobs(log)) == before


def test_a_job_computes_with_its_own_thread_count(monkeypatch):
    """Snakemake gives each job its rule's `threads` as OMP_NUM_THREADS, which OpenMP read in the server, not in
    the job: the child passes it to torch."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
            _apply_thread_count()
            assert torch.get_num_threads() == threads
        monkeypatch.delenv("OMP_NUM_THREADS")  # a job outside Snakemake: every core, as torch's own default
        _apply_thread_count()
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(before)


def test_the_toy_run_ran_its_cpu_jobs_in_the_server(toy_run):
    """The shared toy run (conftest.py) is a local run: its jobs ran in the server that its onstart started."""
    log = toy_run / "logs/fork_server.log"
    commands = [line.rsplit("seg4diff-repro ", 1)[1] for line in server_jobs(log)]
    for command in ("extract-attention", "score-layers", "generate-run", "magnet-train", "toy-world-summary"):
        assert command in commands, f"{command} did not run in the server: {sorted(set(commands))}"
    statuses = [line.split("ended with status ")[1].split()[0] for line in log.read_text().splitlines()
                if "ended with status" in line]
    assert len(statuses) == len(commands) and set(statuses) == {"0"}
    assert log.read_text().rstrip().endswith("stopped"), "Snakemake's onsuccess stopped the server"
