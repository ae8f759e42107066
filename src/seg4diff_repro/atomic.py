"""Atomic writes of files and folders: a reader (or Snakemake) sees the old version or the complete new one.

Files and folders are written under a hidden temporary name next to their target and renamed onto it
at the end; anything left over by a failure is removed. Results get the modes a plain ``open()`` or
``mkdir()`` would give them (the umask's), so outputs shared between users or containers stay readable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "remove_leftover_temp_files",
    "replace_folder_atomically",
]


def current_umask() -> int:
    """The process umask (read by setting and restoring it, as POSIX offers no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``; create the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_leftover_temp_files(folder: str | Path) -> int:
    """Delete the temp files (``.<name>.<random>.tmp``) that writers killed by SIGKILL left under ``folder``.

    Only for a folder that this process alone writes (a Snakemake job's own output folder); returns the count.
    """
    leftovers = [path for path in Path(folder).rglob(".*.tmp") if path.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` as UTF-8, byte for byte (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON (key order preserved, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _swap_folder(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` onto ``target``, which ends up either unchanged or ``new``."""
    if not target.exists():
        new.rename(target)
        return
    # Move the old folder aside first: a rename onto a non-empty folder fails, and deleting it before
    # the rename would leave nothing at the target if the rename then failed.
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed between the two renames or during the rmtree
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


@contextmanager
def replace_folder_atomically(target: str | Path, *, staging: Path | None = None) -> Iterator[Path]:
    """Yield an empty sibling folder of ``target`` to fill; when the block completes, it replaces ``target``.

    ``target`` is therefore either unchanged (the block or the swap failed; the staging folder is then
    removed) or the complete new folder. Checks that must refuse to replace ``target`` belong inside
    the block. The staging folder is ``staging`` or, by default, ``.<name>.partial`` next to ``target``:
    a fixed path, so that the next run clears what a killed run (SIGKILL skips all cleanup) left there.
    One writer per target at a time, as Snakemake runs one job per output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    # A plain mkdir (not tempfile.mkdtemp, which forces mode 0700) so the folder gets the usual umask mode.
    staging.mkdir()
    try:
        yield staging
        _swap_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
