"""Progress of long loops: a tqdm bar on a terminal, one log line every few seconds in a log file.

Snakemake sends each job's stderr to its log file, where tqdm's carriage-return updates pile up into one
unreadable line. `progress` gives the usual bar when stderr is a terminal and otherwise writes a plain log line
(count, rate, elapsed time and ETA) at most every ``interval`` seconds, plus one when the loop ends.
`quiet_library_progress_bars` turns off the loading and download bars of diffusers, transformers and the hub
in the same situation; `log_folder_growth` then logs a hub download's progress from the bytes arriving on disk. Use these instead of importing tqdm directly (tests/test_progress.py checks it).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("seg4diff_repro.progress")

LOG_INTERVAL_S = 10.0
DOWNLOAD_LOG_INTERVAL_S = 30.0
# Without the bar itself: a log line has no width to fill.
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed} elapsed, {rate_fmt}{postfix}]"


class _LogLines(tqdm):
    """tqdm whose every refresh is one log line (no carriage returns, no cursor moves)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clears a bar with an empty message; a log has nothing to clear
            return True
        log.info("%s", self.__str__() if msg is None else msg)
        self._last_logged_n = self.n
        return True

    def close(self) -> None:
        if self.disable:
            return
        # The final count, unless the last line already showed it.
        if getattr(self, "_last_logged_n", None) != self.n:
            self.display()
        self.disable = True
        self._decr_instances(self)


def interactive(stream=None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, where a live bar is readable."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | float | None = None,
    unit: str = "it",
    interval: float = LOG_INTERVAL_S,
    stream=None,
    **kwargs,
) -> tqdm:
    """A progress bar over ``iterable`` (or updated by hand): tqdm on a terminal, log lines otherwise.

    ``stream`` is the terminal check's stream (default stderr); extra keyword arguments go to tqdm
    (``initial``, ``unit_scale``, ``disable``, ...).
    """
    if interactive(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream or sys.stderr, **kwargs)
    has_total = total is not None or (iterable is not None and hasattr(iterable, "__len__"))
    return _LogLines(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        mininterval=interval,
        maxinterval=max(interval, 1.0),
        miniters=1,
        bar_format=_LINE_FORMAT if has_total else _LINE_FORMAT_NO_TOTAL,
        file=sys.stderr,
        **kwargs,
    )


def quiet_library_progress_bars(stream=None) -> bool:
    """Turn off diffusers', transformers' and the hub's loading/download bars when stderr is not a terminal.

    Returns whether it did. Sets the hub's environment switch (which the hub and transformers read at import)
    and configures whichever of the three is already imported, importing none: call it at start-up and
    again after importing diffusers.
    """
    if interactive(stream):
        return False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    return True


def _bytes_under(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (links not followed; a file gone while counting is skipped)."""
    total = 0
    for root, _folders, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


@contextmanager
def log_folder_growth(folder: Path, *, desc: str, interval: float | None = None, stream=None) -> Iterator[None]:
    """While the block runs, a log line every ``interval`` seconds (default DOWNLOAD_LOG_INTERVAL_S) with the bytes
    added under ``folder`` since it began, and one at the end: the progress of a library's download whose own bars
    `quiet_library_progress_bars` turned off. Nothing on a terminal (``stream``, default stderr), where they show."""
    if interactive(stream):
        yield
        return
    interval = DOWNLOAD_LOG_INTERVAL_S if interval is None else interval
    start, initial, stop = time.monotonic(), _bytes_under(folder), threading.Event()

    def report() -> None:
        added, elapsed = _bytes_under(folder) - initial, time.monotonic() - start
        size = f"{added / 1e9:.2f} GB" if added >= 1e9 else f"{added / 1e6:.1f} MB"
        log.info("%s: %s [%.0f s elapsed, %.1f MB/s]", desc, size, elapsed, added / 1e6 / max(elapsed, 1e-9))

    def report_every_interval() -> None:
        while not stop.wait(interval):
            report()

    thread = threading.Thread(target=report_every_interval, name="log_folder_growth", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report()
