"""Progress in job logs: plain lines (no carriage-return walls), and the package's loops all go through it."""

from __future__ import annotations

import ast
import os
import io
import logging
import re
import time
from pathlib import Path

import pytest

from seg4diff_repro.progress import log_folder_growth, progress, quiet_library_progress_bars

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


def rule_sections(text: str) -> dict[str, dict[str, str]]:
    """rule name -> {section name: its indented body} of a .smk file's rules."""
    rules = {}
    for block in re.split(r"^rule ", text, flags=re.MULTILINE)[1:]:
        name, body = block.split(":\n", 1)
        sections = re.findall(r"^    (\w+):(.*\n(?:(?:        .*)?\n)*)", body, flags=re.MULTILINE)
        rules[name] = {section: content.strip() for section, content in sections}
    return rules


def test_every_gpu_or_download_rule_says_what_it_does_and_where_its_progress_goes():
    """Snakemake's console shows a rule's message instead of `rule x: n of N steps`: each rule that may run on a
    GPU (a `gpu` resource) or downloads (a `downloads` resource) has one, naming its log."""
    checked, missing = [], []
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        for name, sections in rule_sections(path.read_text()).items():
            if not re.search(r"^\s*(gpu|downloads)=", sections.get("resources", ""), flags=re.MULTILINE):
                continue
            checked.append(name)
            if "{log}" not in sections.get("message", ""):
                missing.append(f"{path.name}: rule {name}")
    assert {"extract_attention_shard", "extract_attention_sweep_shard", "download_model", "download_dataset_archive",
            "verify"} <= set(checked)
    assert not missing, f"rules without a message that names their {{log}}: {missing}"


def _grow(folder: Path, chunks: int, pause_s: float) -> None:
    """A stand-in download: ``chunks`` files of 1 MB arriving under ``folder``, ``pause_s`` apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(chunks):
        (folder / f"blob{index}.incomplete").write_bytes(b"\0" * 1_000_000)
        time.sleep(pause_s)


def test_a_download_logs_the_bytes_arriving_in_its_folder_and_a_terminal_gets_nothing_extra(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="seg4diff_repro.progress")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub/old").write_bytes(b"\0" * 5_000_000)  # there before: not counted
    (tmp_path / "hub/link").symlink_to(tmp_path / "hub/old")  # a snapshot link: not counted twice
    with log_folder_growth(tmp_path / "hub", desc="downloading a/b", interval=0.05, stream=io.StringIO()):
        _grow(tmp_path / "hub/blobs", chunks=4, pause_s=0.1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) >= 3 and all(line.startswith("downloading a/b: ") for line in lines)
    sizes = [float(re.match(r"downloading a/b: ([\d.]+) MB \[\d+ s elapsed, [\d.]+ MB/s\]$", line)[1]) for line in lines]
    assert sizes == sorted(sizes) and sizes[-1] == 4.0  # the last line, at the end: the 4 new files of 1 MB
    caplog.clear()
    with log_folder_growth(tmp_path / "hub", desc="downloading a/b", interval=0.05, stream=_Terminal()):
        _grow(tmp_path / "hub/more", chunks=2, pause_s=0.1)
    assert caplog.records == []


def test_download_model_logs_the_progress_of_the_hub_download(tmp_path, monkeypatch, caplog):
    """The model-download job's log gets the folder-growth lines of the model's hub cache folder."""
    pytest.importorskip("diffusers")
    from huggingface_hub import constants

    import seg4diff_repro.models.common as common
    import seg4diff_repro.progress as progress_module
    from seg4diff_repro.models import download_model

    def fake_download(pipeline_class, source, revision=None, **components):
        _grow(tmp_path / "hub/models--owner--model/blobs", chunks=3, pause_s=0.1)
        return tmp_path / "hub/models--owner--model/snapshots/abc"

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(common, "download_pipeline", fake_download)
    monkeypatch.setattr(common, "model_fingerprint", lambda source, revision: f"hub:{source}")
    monkeypatch.setattr(progress_module, "DOWNLOAD_LOG_INTERVAL_S", 0.05)
    monkeypatch.setattr(progress_module, "interactive", lambda stream=None: False)
    caplog.set_level(logging.INFO, logger="seg4diff_repro.progress")
    download_model("sd3", "owner/model")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) >= 3 and lines[-1].startswith("downloading owner/model: 3.0 MB ["), lines
