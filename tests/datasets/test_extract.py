"""Safe extraction: members that would land outside the target folder are refused before anything is written."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest
from ds_support import tar_bytes, zip_bytes

from seg4diff_repro.datasets.download import ArchiveError, SafeArchive, UnsafeArchiveError, safe_extract


def _tar(tmp_path, entries) -> str:
    """entries: (name, kind, payload) with kind file | sym | hard | fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = payload or ""
            tar.addfile(info)
    path = tmp_path / "a.tar"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(
    "entries, match",
    [
        ([("ok/a.txt", "file", b"x"), ("ok/../../evil.txt", "file", b"x")], r"'ok/\.\./\.\./evil\.txt'.*'\.\.'"),
        ([("ok/a.txt", "file", b"x"), ("/tmp/evil.txt", "file", b"x")], "absolute path"),
        ([("ok/a.txt", "file", b"x"), ("ok/link", "sym", "../../etc/passwd")], "points outside"),
        ([("ok/a.txt", "file", b"x"), ("ok/link", "sym", "/etc/passwd")], "points outside"),
        ([("ok/a.txt", "file", b"x"), ("ok/hard", "hard", "../outside.txt")], "points outside"),
        ([("ok/a.txt", "file", b"x"), ("ok/pipe", "fifo", None)], "special file"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out", "fifo"],
)
def test_tar_members_escaping_the_target_are_refused(tmp_path, entries, match):
    archive = _tar(tmp_path, entries)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, dest)
    assert not dest.exists()  # refused before writing anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_zip_dotdot_and_symlink_out_are_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(zip_bytes({"data/x.png": b"x", "data/../../escape.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError, match="escape.txt"):
        safe_extract(bad, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        safe_extract(link, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_internal_links_and_selection(tmp_path):
    archive = _tar(
        tmp_path,
        [("d/a.txt", "file", b"A"), ("d/b.txt", "file", b"B"), ("d/link", "sym", "a.txt"), ("./d/c.txt", "file", b"C")],
    )
    written = safe_extract(archive, tmp_path / "out", lambda rel: rel != "d/b.txt")
    out = tmp_path / "out" / "d"
    assert sorted(p.name for p in written) == ["a.txt", "c.txt", "link"]
    assert (out / "link").read_bytes() == b"A" and not (out / "link").is_symlink()
    assert not (out / "b.txt").exists()
    with SafeArchive(archive) as arc:
        assert arc.read_bytes("d/c.txt") == b"C"


@pytest.mark.parametrize("kind", ["truncated-tar", "truncated-zip", "garbage"])
def test_corrupt_archives_give_a_clear_error(tmp_path, kind):
    payload = {f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg": bytes(range(256)) * 40 for i in range(5)}
    data = {
        "truncated-tar": tar_bytes(payload)[:15000],
        "truncated-zip": zip_bytes(payload)[:-200],
        "garbage": b"<html>Please log in</html>" * 10,
    }[kind]
    path = tmp_path / "x.archive"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match=r"x\.archive.*(corrupt|truncated|neither)"):
        with SafeArchive(path) as arc:
            arc.extract(tmp_path / "out")
