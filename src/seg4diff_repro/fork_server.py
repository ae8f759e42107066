"""Run the workflow's `seg4diff-repro` jobs in processes forked from one warm interpreter.

A job that imports torch and diffusers spends 7-10 s of a core on the imports before it computes, and the toy
world's run has about 90 such jobs besides 165 lighter ones: on a 2-core machine that start-up is a third of the
run. While Snakemake runs locally, the workflow (`onstart` in the Snakefile) starts this server, which imports
the heavy libraries once and then forks a child per job: the job's `seg4diff-repro` command, a thin client
(`run_job`, which `python -m seg4diff_repro` and `cli.main` call first), hands over its arguments, working folder, environment and its
stdin/stdout/stderr (so the job's `log:` gets what it prints), waits, and exits with the child's status. The child
runs the same `cli` code in the same interpreter build with the same `sys.path` as the job would have, so the
outputs are those of a job run on its own (tests compare them byte for byte).

What the client does not get from the server, it does itself, so a job never depends on the server:
- no server (the variable unset, its socket gone, another environment such as `--sdm conda`) or a GPU job
  (`--device cuda`: CUDA does not survive a fork): the job runs in its own process, as without this module;
- a signal to the client (Snakemake cancelling the job) goes on to the child; a client that dies closes the
  connection, and the child then stops itself;
- the server stops with its Snakemake process (`onsuccess`/`onerror`, or within a second of its exit).

Snakemake's `benchmark:` files measure the client's process tree: under the server their wall time (`s`) is the
job's, their memory and CPU columns are the client's. Set SEG4DIFF_FORK_SERVER=off before Snakemake to measure
a job's memory (every job then runs in its own process).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# The jobs' environment variable: the socket of the server, or "off" (set by the user) for no server.
SERVER_ENV = "SEG4DIFF_FORK_SERVER"
# What the server imports before it forks: the libraries that make a job's start-up slow. A module missing from
# the environment is skipped (logged); the job that needs it imports it itself and fails there as it would anyway.
PRELOAD = (
    "numpy", "scipy.ndimage", "scipy.optimize", "PIL.Image", "pandas", "matplotlib.pyplot", "seaborn",
    "torch", "transformers", "diffusers", "open_clip", "pycocotools.mask",
    "seg4diff_repro.cli", "seg4diff_repro.attention.extract", "seg4diff_repro.generation.runs",
)
# Pipeline classes that diffusers resolves lazily on first use: resolving them imports their modules.
PRELOAD_ATTRIBUTES = (
    ("diffusers", "StableDiffusion3Pipeline"), ("diffusers", "FluxPipeline"), ("diffusers", "AutoencoderKL"),
    ("transformers", "CLIPTextModelWithProjection"), ("transformers", "T5EncoderModel"),
)
# The thread-count variables Snakemake sets for a job (to the rule's `threads`).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_HEADER = struct.Struct("!I")  # length of the JSON request that follows it
_PARENT_POLL_S = 1.0
_REQUEST_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)


def _environment_key() -> dict:
    """What must agree between a job's interpreter and the server's for the fork to run the job's own code.

    `sys.path[0]` is left out: it is the folder of the started script or module, which differs between the
    client and the server and holds none of the job's code (workflow/bin holds a shell script).
    """
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix, "path": sys.path[1:]}


def _send_json(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _exit_status(error: BaseException | None) -> int:
    """The status Python would exit with after ``error`` (None: normal end), printing what Python would print."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None:
            return 0
        if isinstance(error.code, int):
            return error.code
        print(error.code, file=sys.stderr)
        return 1
    traceback.print_exception(error)
    return 130 if isinstance(error, KeyboardInterrupt) else 1


# ---------------------------------------------------------------------------------------------------------- client
def run_in_server(argv: Sequence[str], socket_path: str | None = None) -> int | None:
    """Run ``seg4diff-repro argv`` in the fork server; its exit status, or None where no server takes it.

    None means the job did not start there (no server, another environment): the caller runs it itself.
    """
    socket_path = socket_path if socket_path is not None else os.environ.get(SERVER_ENV, "")
    if not socket_path or socket_path == "off" or _device(argv) != "cpu":
        return None
    return _Client().run(argv, socket_path)


def run_job(argv: list[str]) -> None:
    """The `seg4diff-repro` command: run ``argv`` in the server where one takes it, else in this process."""
    status = run_in_server(argv)
    if status is not None:
        sys.exit(status)
    from seg4diff_repro.cli import run_command

    run_command(argv)


def _device(argv: Sequence[str]) -> str:
    """The job's `--device` (cpu where it names none). GPU jobs run on their own: CUDA does not survive a fork, and
    for them the imports are a small part of the work."""
    for index, arg in enumerate(argv):
        if arg == "--device" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cpu"


class _Client:
    """One job handed to the server; the signals that cancel the job go on to the child that runs it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.child: int | None = None
        self.received: list[int] = []

    def forward(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if self.child is not None:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass

    def run(self, argv: Sequence[str], socket_path: str) -> int | None:
        # Caught from before the connection: a signal that comes while the job starts still reaches it.
        previous = {signum: signal.signal(signum, self.forward) for signum in self.SIGNALS}
        status = self._run(argv, socket_path)
        if status is None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.received:  # cancelled before it started: not to be started here either
                return 128 + self.received[-1]
        return status

    def _run(self, argv: Sequence[str], socket_path: str) -> int | None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(socket_path)
        except OSError:
            conn.close()
            return None
        request = json.dumps({
            "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "key": _environment_key(),
        }).encode()
        with conn:
            try:
                socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
                conn.sendall(request)
                replies = conn.makefile("r")
                first = replies.readline()
            except OSError:
                return None
            if not first or "refused" in json.loads(first):
                return None
            self.child = int(json.loads(first)["pid"])
            if self.received:  # a signal before the child was known
                self.forward(self.received[-1], None)
            try:
                last = replies.readline()
            except OSError:
                last = ""
        if last:
            return int(json.loads(last)["status"])
        # The child ended without a status: killed (by the signal passed on to it, or from outside).
        if self.received:
            return 128 + self.received[-1]
        print(f"seg4diff-repro: the job's process {self.child} in the fork server ended without an exit status "
              "(killed?); see logs/fork_server.log", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------- server
def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _flags, _address = socket.recv_fds(conn, _HEADER.size, 3)
    while len(header) < _HEADER.size:
        more = conn.recv(_HEADER.size - len(header))
        if not more:
            raise ConnectionError("the client closed the connection before its request")
        header += more
    (length,) = _HEADER.unpack(header)
    body = b""
    while len(body) < length:
        more = conn.recv(min(1 << 20, length - len(body)))
        if not more:
            raise ConnectionError("the client closed the connection in the middle of its request")
        body += more
    return json.loads(body), fds


def _stop_when_client_goes(conn: socket.socket, finished: threading.Event) -> None:
    """A client killed without a chance to forward the signal closes the connection: stop the job then."""
    try:
        gone = not conn.recv(1)
    except OSError:
        gone = True
    if gone and not finished.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def _apply_thread_count() -> None:
    """Give torch the job's thread count: Snakemake's OMP_NUM_THREADS (the rule's `threads`), else every core.

    OpenMP reads the variable when the library loads, which was in the server (with one thread), not in the job:
    without this, each job would compute with the server's count.
    """
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                                             else os.cpu_count() or 1)


def _run_child(conn: socket.socket, request: dict, fds: list[int], run: Callable[[list[str]], object]) -> int:
    """In the forked child: become the job (stdio, folder, environment), run it, report its status."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as Python sets it up for the job's own stdout
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _apply_thread_count()
    sys.argv = ["seg4diff-repro", *request["argv"]]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    root = logging.getLogger()
    for handler in root.handlers[:]:  # the server's log: the job configures its own, on its stderr
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    _send_json(conn, {"pid": os.getpid()})
    finished = threading.Event()
    threading.Thread(target=_stop_when_client_goes, args=(conn, finished), daemon=True).start()
    error: BaseException | None = None
    try:
        run(request["argv"])
    except BaseException as raised:  # noqa: BLE001 - every ending becomes the status a process would exit with
        error = raised
    status = _exit_status(error)
    # What a normal interpreter exit does; the child leaves with os._exit so as not to unwind the server's stack.
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    finished.set()
    try:
        _send_json(conn, {"status": status})
    except OSError:
        pass
    return status


def _preload() -> None:
    from seg4diff_repro.progress import quiet_library_progress_bars

    quiet_library_progress_bars()  # as cli.main does first: the hub reads its switch at import
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - an optional library: its jobs import it themselves
            log.info("preload: %s not imported (%s)", name, error)
    for module, attribute in PRELOAD_ATTRIBUTES:
        try:
            getattr(importlib.import_module(module), attribute)
        except Exception as error:  # noqa: BLE001
            log.info("preload: %s.%s not resolved (%s)", module, attribute, error)
    quiet_library_progress_bars()


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_children(running: dict[int, float], wait_s: float = 0.0) -> None:
    """Log the ended jobs; with ``wait_s``, wait that long for the running ones to end (the server stopping)."""
    deadline = time.monotonic() + wait_s
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            running.clear()
            return
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)
            continue
        started = running.pop(pid, None)
        took = f" after {time.monotonic() - started:.1f} s" if started is not None else ""
        log.info("job process %d ended with status %d%s", pid, os.waitstatus_to_exitcode(status), took)


def _start_job(conn: socket.socket, listener: socket.socket, running: dict[int, float]) -> None:
    """Read a client's request and fork the child that runs it (or refuse: another user, another environment)."""
    from seg4diff_repro.cli import run_command

    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    if uid != os.getuid():  # only this user's jobs (the socket's folder is private too)
        return
    conn.settimeout(_REQUEST_TIMEOUT_S)
    try:
        request, fds = _receive_request(conn)
    except (OSError, ValueError) as error:
        log.info("no request read from a client (%s)", error)
        return
    conn.settimeout(None)
    command = " ".join(request["argv"][:1])
    if request["key"] != _environment_key():
        for fd in fds:
            os.close(fd)
        _send_json(conn, {"refused": "the job's Python environment differs from the server's"})
        log.info("refused %s: the job's Python environment differs from the server's", command)
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing of the server's buffered output may reach a job's log
    child = os.fork()
    if child == 0:
        status = 1
        try:
            listener.close()
            status = _run_child(conn, request, fds, run_command)
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    running[child] = time.monotonic()
    log.info("job process %d: seg4diff-repro %s", child, command)


def serve(socket_path: Path, *, parent_pid: int | None = None) -> None:
    """Import the heavy libraries, then fork a child per connection until SIGTERM or ``parent_pid`` exits.

    Writes its pid next to the socket (`pid`) first, and listens once the imports are done.
    """
    socket_path.with_name("pid").write_text(str(os.getpid()))
    started = time.monotonic()
    _preload()
    log.info("preloaded in %.1f s (pid %d)", time.monotonic() - started, os.getpid())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(64)
    listener.settimeout(_PARENT_POLL_S)
    running: dict[int, float] = {}
    try:
        while not stopping.is_set() and _parent_alive(parent_pid):
            _reap_children(running)
            try:
                conn, _address = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                _start_job(conn, listener, running)
    finally:
        listener.close()
        _reap_children(running, wait_s=5.0)  # Snakemake stops it when its jobs are done: log the last ones' ends
        socket_path.unlink(missing_ok=True)
        socket_path.with_name("pid").unlink(missing_ok=True)
        try:
            socket_path.parent.rmdir()  # start_server's private folder, now empty
        except OSError:
            pass
        log.info("stopped")


# ---------------------------------------------------------------------------------------------- the workflow's hooks
def start_server(log_path: Path, *, parent_pid: int, env: dict[str, str] | None = None) -> str | None:
    """Start a server for the Snakemake process ``parent_pid``; its socket path, or None where it is off.

    ``env`` is the jobs' environment: the server runs the `python` its PATH finds first, as the jobs'
    `seg4diff-repro` does (workflow/bin). It does not wait for the server's imports: until it listens, jobs run on
    their own, in parallel with them.
    """
    env = dict(os.environ if env is None else env)
    if env.get(SERVER_ENV) == "off":
        return None
    folder = Path(tempfile.mkdtemp(prefix="s4d-"))  # private (0700): only this user reaches the socket
    if len(str(folder / "server.sock")) > 100:  # the length limit of a Unix socket's path
        folder.rmdir()
        folder = Path(tempfile.mkdtemp(prefix="s4d-", dir="/tmp"))
    socket_path = folder / "server.sock"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env.pop(SERVER_ENV, None)
    # The server computes nothing: its BLAS and OpenMP libraries load with one thread; each job sets its own.
    env.update({name: "1" for name in _THREAD_VARIABLES})
    env["CUDA_VISIBLE_DEVICES"] = ""  # nor does it touch a GPU: it serves CPU jobs only (_device)
    with open(log_path, "ab") as log_file:
        subprocess.Popen(
            ["python", "-m", "seg4diff_repro.fork_server", "--socket", str(socket_path),
             "--parent-pid", str(parent_pid)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env, start_new_session=True,
        )
    return str(socket_path)


def stop_server(socket_path: str | None) -> None:
    """Stop the server of ``start_server`` (its jobs have ended: Snakemake calls this when the run is over)."""
    if not socket_path:
        return
    pid_file = Path(socket_path).with_name("pid")
    deadline = time.monotonic() + 5.0
    while not pid_file.exists() and time.monotonic() < deadline:  # a server still starting
        time.sleep(0.1)
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)
    while Path(socket_path).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        pid_file.parent.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True, type=Path, help="where to listen (a Unix socket path)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (Snakemake) has ended")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fork-server %(levelname)s: %(message)s")
    serve(args.socket, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
