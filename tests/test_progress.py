"""Progress in job logs: plain lines (no carriage-return walls), and the package's loops all go through it."""

from __future__ import annotations

import ast
import os
import io
import logging
from pathlib import Path

import pytest

from seg4diff_repro.progress import progress, quiet_library_progress_bars

REPO = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_with_count_rate_and_eta_and_no_carriage_returns(caplog, capsys):
    caplog.set_level(logging.INFO, logger="seg4diff_repro.progress")
    items = list(progress(range(5), desc="extract attention", unit="batch", interval=0.0, stream=io.StringIO()))
    assert items == list(range(5))
    lines = [record.getMessage() for record in caplog.records]
    # interval 0: the opening line, one per item; the last one is the whole count.
    assert len(lines) == 6
    assert lines[-1].startswith("extract attention: 5/5 (100%)")
    assert "ETA" in lines[-1] and "batch/s" in lines[-1]
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out + "".join(lines)


def test_a_log_line_is_written_at_most_every_interval_plus_the_final_count(caplog):
    caplog.set_level(logging.INFO, logger="seg4diff_repro.progress")
    with progress(total=1000, desc="images", unit="image", interval=3600.0, stream=io.StringIO()) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["images: 0/1000", "images: 1000/1000"]


def test_a_terminal_gets_the_usual_live_bar():
    terminal = _Terminal()
    for _ in progress(range(3), desc="shards", stream=terminal, mininterval=0.0):
        pass
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_no_module_of_the_package_uses_tqdm_directly():
    offenders = []
    for path in sorted((REPO / "src/seg4diff_repro").rglob("*.py")):
        if path.name == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "tqdm" for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"import seg4diff_repro.progress instead of tqdm in {offenders}"


def test_library_loading_bars_are_off_in_a_log_and_left_alone_on_a_terminal(monkeypatch):
    diffusers_logging = pytest.importorskip("diffusers.utils.logging")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    diffusers_logging.enable_progress_bar()
    try:
        assert quiet_library_progress_bars(stream=_Terminal()) is False
        assert diffusers_logging.is_progress_bar_enabled()
        assert quiet_library_progress_bars(stream=io.StringIO()) is True
        assert not diffusers_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        diffusers_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
