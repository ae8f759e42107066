"""Fetch and unpack dataset archives: streaming with a progress bar, HTTP Range resume, retries with
exponential backoff, checksum verification, and extraction that refuses members escaping the target folder.

Files on disk:

* ``<dest>.part``      the transfer in progress (kept across interruptions, resumed with ``Range``)
* ``<dest>``           appears only once its checksum verified (renamed from ``.part``)
* ``<dest>.verified``  JSON record {algo, digest, size, mtime_ns} so a verified file is neither hashed
                        nor fetched again while it is unchanged
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "seg4diff-repro-datasets/1 (+https://github.com/; python-urllib)"
#: HTTP statuses worth retrying (server busy or a transient proxy failure).
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A file could not be fetched (after all retries, from every URL)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded or supplied file does not have the published checksum (the file was removed)."""


class LoginRequiredError(DownloadError):
    """The archive needs a login; the user has to put it in place (the message says where)."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder."""


class ArchiveError(RuntimeError):
    """An archive is unreadable: corrupt, truncated or of an unknown format."""


# ---------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------


def _new_hasher(algo: str):
    if algo not in {"md5", "sha1", "sha256"}:
        raise ValueError(f"unsupported checksum algorithm {algo!r} (md5, sha1 or sha256)")
    return hashlib.new(algo)


def file_digest(path: Path, algo: str) -> str:
    hasher = _new_hasher(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _read_marker(path: Path) -> dict | None:
    marker = _marker_path(path)
    try:
        record = json.loads(marker.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None  # the file changed since it was verified
    return record


def _write_marker(path: Path, algo: str, digest: str, *, trusted_on_first_use: bool = False) -> None:
    st = path.stat()
    record = {"algo": algo, "digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if trusted_on_first_use:
        record["trusted_on_first_use"] = True
    tmp = _marker_path(path).with_name(f"{_marker_path(path).name}.{os.getpid()}.tmp")  # jobs may share an archive
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, _marker_path(path))


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def verify_file(path: Path, checksum: tuple[str, str] | None, *, origin: str | None = None) -> tuple[str, str]:
    """Verify ``path`` against ``checksum`` (algo, hex); returns the (algo, digest) that holds.

    A still-valid ``.verified`` record skips re-hashing. On a mismatch the file (and its record) is
    removed and :class:`ChecksumMismatchError` names ``origin`` (the URL, or the path) and both digests.
    With ``checksum=None`` (nothing published) the sha256 is recorded on first use and later runs
    compare against that record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    record = _read_marker(path)
    if checksum is None:
        if record is not None:
            return record["algo"], record["digest"]
        digest = file_digest(path, "sha256")
        log.warning("%s: no published checksum; recording sha256 %s (trust on first use)", path, digest)
        _write_marker(path, "sha256", digest, trusted_on_first_use=True)
        return "sha256", digest
    algo, expected = checksum[0].lower(), checksum[1].lower()
    if record is not None and record.get("algo") == algo and record.get("digest") == expected:
        return algo, expected
    actual = file_digest(path, algo)
    if actual != expected:
        _remove(path, _marker_path(path))
        raise ChecksumMismatchError(
            f"checksum mismatch for {origin or path}: expected {algo} {expected}, got {algo} {actual}. "
            f"The bad file {path} was removed; run the download again (if it keeps failing, the source "
            "changed or a proxy alters it)."
        )
    _write_marker(path, algo, expected)
    return algo, expected


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------


class _Retry(Exception):
    """A transient failure: try again (from the bytes already on disk)."""


class _NextURL(Exception):
    """A permanent failure for this URL (404, 403, ...): try the next mirror."""


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    from seg4diff_repro.progress import progress

    # In a Snakemake log (not a terminal): a line every half minute.
    return progress(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, interval=30.0,
    )


def _hash_existing(path: Path, algo: str):
    hasher = _new_hasher(algo)
    if path.exists():
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                hasher.update(chunk)
    return hasher


def _fetch_once(url: str, part: Path, algo: str, state: dict, *, timeout: float, progress: bool, desc: str) -> None:
    """One HTTP request that appends to ``part``; raises _Retry/_NextURL, returns when complete."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            # Range not satisfiable: either the part is already complete or it is longer than the file.
            match = _CONTENT_RANGE.match(err.headers.get("Content-Range", "") or "")
            if match and match.group(3) != "*" and int(match.group(3)) == have:
                state["total"] = have
                return
            log.warning("%s: server refused resuming at byte %d; starting over", url, have)
            _remove(part)
            state["hasher"] = _new_hasher(algo)
            raise _Retry(f"HTTP 416 at offset {have}") from err
        if err.code in RETRY_STATUSES:
            raise _Retry(f"HTTP {err.code} {err.reason}") from err
        raise _NextURL(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
        raise _Retry(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "") or "")
            start = int(match.group(1)) if match and match.group(1) else None
            if start != have:
                log.warning("%s: server resumed at byte %s instead of %d; starting over", url, start, have)
                _remove(part)
                state["hasher"] = _new_hasher(algo)
                raise _Retry("unexpected Content-Range")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        elif status == 200:
            if have:
                log.info("%s: server ignored the Range request; downloading from the start", url)
            have = 0
            state["hasher"] = _new_hasher(algo)
            total = int(length) if length is not None else None
            mode = "wb"
        else:
            raise _NextURL(f"unexpected HTTP status {status}")
        state["total"] = total
        if total is not None and state.get("expected_total") not in (None, total):
            log.warning("%s: size changed from %s to %s bytes", url, state["expected_total"], total)
        state["expected_total"] = total
        hasher = state["hasher"]
        written = have
        with open(part, mode) as out, _progress_bar(total, have, desc, progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as err:
                    raise _Retry(f"transfer interrupted after {written} bytes ({type(err).__name__})") from err
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                written += len(chunk)
                state["progressed"] = True
                bar.update(len(chunk))
        if total is not None and written < total:
            raise _Retry(f"connection closed after {written} of {total} bytes")
        if total is not None and written > total:
            _remove(part)
            state["hasher"] = _new_hasher(algo)
            raise _Retry(f"received {written} bytes, more than the announced {total}")


def download(
    urls: str | Sequence[str],
    dest: str | Path,
    checksum: tuple[str, str] | None,
    *,
    retries: int = 5,
    backoff: float = 2.0,
    max_backoff: float = 120.0,
    timeout: float = 60.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, str]:
    """Download ``urls`` (mirrors, tried in order) to ``dest`` and verify it; returns (algo, digest).

    * A file that already verified is not fetched again.
    * The transfer streams to ``<dest>.part``; after an interruption it resumes with an HTTP Range
      request (a server that ignores Range is handled by starting over).
    * Transient failures (connection errors, timeouts, 5xx/429, short reads) are retried up to
      ``retries`` times in a row without progress, sleeping ``backoff * 2**k`` seconds (capped).
    * On a checksum mismatch the file is removed and :class:`ChecksumMismatchError` names the URL and
      both checksums; nothing is left that looks done.
    """
    dest = Path(dest)
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError(f"no URL given for {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        try:
            result = verify_file(dest, checksum, origin=f"{dest} (already present)")
            log.info("%s already present and verified (%s %s); not downloading", dest, *result)
            return result
        except ChecksumMismatchError as err:
            log.warning("%s; downloading it again", err)

    part = dest.with_name(dest.name + ".part")
    algo = checksum[0].lower() if checksum else "sha256"
    state: dict = {"hasher": _hash_existing(part, algo), "expected_total": None}
    if part.exists():
        log.info("resuming %s from byte %d", part, part.stat().st_size)

    errors: list[str] = []
    done_url = None
    for url in url_list:
        failures = 0
        while True:
            state["progressed"] = False
            try:
                _fetch_once(url, part, algo, state, timeout=timeout, progress=progress, desc=dest.name)
                done_url = url
                break
            except _NextURL as err:
                errors.append(f"{url}: {err}")
                log.warning("%s: %s; trying the next mirror if any", url, err)
                break
            except _Retry as err:
                failures = 0 if state["progressed"] else failures + 1
                if failures > retries:
                    errors.append(f"{url}: {err} (gave up after {retries} retries without progress)")
                    log.warning("%s: %s; giving up on this URL", url, err)
                    break
                delay = min(max_backoff, backoff * (2 ** max(failures - 1, 0)))
                log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, err, delay, failures, retries)
                sleep(delay)
        if done_url:
            break
    if not done_url:
        raise DownloadError(
            f"could not download {dest.name}; tried:\n  " + "\n  ".join(errors) + f"\nA partial file, if any, is "
            f"kept as {part} and the next run resumes it."
        )

    actual = state["hasher"].hexdigest()
    if checksum is not None and actual != checksum[1].lower():
        _remove(part)
        raise ChecksumMismatchError(
            f"checksum mismatch for {done_url}: expected {algo} {checksum[1].lower()}, got {algo} {actual}. "
            f"The bad download was removed (nothing is marked as done); run again to re-download, and if "
            "it keeps failing the source changed or a proxy alters it."
        )
    os.replace(part, dest)
    _write_marker(dest, algo, actual, trusted_on_first_use=checksum is None)
    if checksum is None:
        log.warning("%s: no published checksum; recorded sha256 %s (trust on first use)", dest, actual)
    log.info("downloaded %s from %s (%s %s)", dest, done_url, algo, actual)
    return algo, actual


# ---------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------


def _check_name(archive: Path, name: str) -> str | None:
    """Normalised relative POSIX path of a member, None for the archive root; raise if it escapes."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name; refusing to extract")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract anything from this archive"
        )
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} contains '..' and would land outside the target folder; "
            "refusing to extract anything from this archive"
        )
    return "/".join(parts) or None


def _check_link(archive: Path, name: str, rel: str, target: str, *, hard: bool) -> str:
    """Resolve a link member's target inside the archive root; raise if it points outside."""
    unified = target.replace("\\", "/")
    if not unified or unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafeArchiveError(
            f"{archive}: link {name!r} -> {target!r} points outside the target folder; refusing to extract"
        )
    base = "" if hard else posixpath.dirname(rel)
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if resolved == ".." or resolved.startswith("../") or resolved == ".":
        raise UnsafeArchiveError(
            f"{archive}: link {name!r} -> {target!r} points outside the target folder; refusing to extract"
        )
    return resolved


@dataclass
class _Member:
    rel: str
    kind: str  # "file" | "dir" | "link"
    link_target: str | None
    handle: object


class SafeArchive:
    """A tar or zip archive whose member names were all checked when it was opened.

    Opening refuses the whole archive if any member is absolute, contains ``..``, is a link that points
    outside the archive root, or is a device/FIFO. Links inside the archive are extracted as copies.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                members = self._zip_members()
            elif tarfile.is_tarfile(self.path):
                self._tar = tarfile.open(self.path, "r:*")
                members = self._tar_members()
            else:
                raise ArchiveError(
                    f"{self.path} is neither a tar nor a zip archive (corrupt or truncated?); delete it and run "
                    "the download again"
                )
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
            self.close()
            raise ArchiveError(f"{self.path} is corrupt or truncated ({err}); delete it and run the download again") from err
        except BaseException:
            self.close()
            raise
        self.members: dict[str, _Member] = {}
        for m in members:
            self.members.setdefault(m.rel, m)

    def _check_tar_complete(self, infos: list[tarfile.TarInfo]) -> None:
        """tarfile stops silently at a truncation; for an uncompressed tar check sizes and the end marker."""
        raw = self._tar.fileobj
        if not isinstance(raw, io.BufferedReader):
            return  # compressed: a truncation surfaces as a decompression error when reading
        size = self.path.stat().st_size
        for info in infos:
            if info.offset_data + info.size > size:
                raise ArchiveError(
                    f"{self.path} is truncated: member {info.name!r} ends at byte {info.offset_data + info.size} "
                    f"but the file has {size} bytes; delete it and run the download again"
                )
        raw.seek(self._tar.offset)
        # POSIX ends a tar with two zero blocks; accept one, so only a real truncation is refused.
        if raw.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ArchiveError(
                f"{self.path} is truncated (no end-of-archive marker after the last member); delete it and "
                "run the download again"
            )

    def _tar_members(self) -> list[_Member]:
        out = []
        infos = self._tar.getmembers()
        self._check_tar_complete(infos)
        for info in infos:
            rel = _check_name(self.path, info.name)
            if rel is None:
                continue
            if info.isdir():
                out.append(_Member(rel, "dir", None, info))
            elif info.issym() or info.islnk():
                target = _check_link(self.path, info.name, rel, info.linkname, hard=info.islnk())
                out.append(_Member(rel, "link", target, info))
            elif info.isfile():
                out.append(_Member(rel, "file", None, info))
            else:
                raise UnsafeArchiveError(
                    f"{self.path}: member {info.name!r} is a device, FIFO or other special file; refusing to extract"
                )
        return out

    def _zip_members(self) -> list[_Member]:
        out = []
        for info in self._zip.infolist():
            rel = _check_name(self.path, info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            if info.is_dir():
                out.append(_Member(rel, "dir", None, info))
            elif stat.S_ISLNK(mode):
                target = self._zip.read(info).decode("utf-8", "surrogateescape")
                out.append(_Member(rel, "link", _check_link(self.path, info.filename, rel, target, hard=False), info))
            else:
                out.append(_Member(rel, "file", None, info))
        return out

    def __enter__(self) -> SafeArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in (self._tar, self._zip):
            if handle is not None:
                handle.close()

    def names(self) -> list[str]:
        return [rel for rel, m in self.members.items() if m.kind != "dir"]

    def _open(self, member: _Member):
        if self._zip is not None:
            return self._zip.open(member.handle)
        fh = self._tar.extractfile(member.handle)
        if fh is None:
            raise ArchiveError(f"{self.path}: cannot read member {member.rel!r}")
        return fh

    def _resolve(self, rel: str, depth: int = 0) -> _Member:
        member = self.members.get(rel)
        if member is None:
            raise KeyError(f"{self.path} has no member {rel!r}")
        if member.kind == "link":
            if depth > 16:
                raise UnsafeArchiveError(f"{self.path}: link loop at {rel!r}")
            return self._resolve(member.link_target, depth + 1)
        return member

    def read_bytes(self, rel: str) -> bytes:
        member = self._resolve(rel)
        try:
            with self._open(member) as fh:
                return fh.read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
            raise ArchiveError(f"{self.path}: member {rel!r} is corrupt ({err}); delete the archive and re-download") from err

    def extract(self, dest: str | Path, select: Callable[[str], bool] | Iterable[str] | None = None) -> list[Path]:
        """Extract the selected members (all by default) under ``dest``; returns the written files.

        ``select`` is a predicate on the member's relative path or a collection of relative paths.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        if select is None:
            wanted = lambda rel: True  # noqa: E731
        elif callable(select):
            wanted = select
        else:
            chosen = set(select)
            wanted = chosen.__contains__
        written = []
        for rel, member in self.members.items():
            if member.kind == "dir" or not wanted(rel):
                continue
            target = dest / rel
            if not target.resolve().is_relative_to(root):  # e.g. through a pre-existing symlink in dest
                raise UnsafeArchiveError(f"{self.path}: member {rel!r} would be written outside {dest}")
            source = self._resolve(rel)
            if source.kind != "file":
                log.warning("%s: skipping link %r to a directory", self.path, rel)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self._open(source) as fh, open(target, "wb") as out:
                    shutil.copyfileobj(fh, out, CHUNK)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
                raise ArchiveError(
                    f"{self.path}: member {rel!r} is corrupt ({err}); delete the archive and run the download again"
                ) from err
            except OSError as err:
                if isinstance(err, (PermissionError, FileNotFoundError)) or err.errno in (28,):
                    raise
                raise ArchiveError(
                    f"{self.path}: member {rel!r} could not be read ({err}); the archive is probably truncated"
                ) from err
            written.append(target)
        return written


def safe_extract(
    archive: str | Path, dest: str | Path, select: Callable[[str], bool] | Iterable[str] | None = None
) -> list[Path]:
    """Check every member of ``archive`` and extract the selected ones under ``dest``.

    Raises :class:`UnsafeArchiveError` before writing anything if a member would land outside ``dest``
    (``../``, absolute paths, links out), and :class:`ArchiveError` for a corrupt archive.
    """
    with SafeArchive(archive) as arc:
        return arc.extract(dest, select)
