"""The notebook in notebooks/ runs as written (its code cells, in order, in a fresh namespace)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import nbformat

REPO = Path(__file__).resolve().parents[1]


def test_attention_recorder_notebook_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    notebook = nbformat.read(REPO / "notebooks/attention_recorder.ipynb", as_version=4)
    # A scratch root with the repository's marker file, so that the notebook builds its inputs there.
    (tmp_path / "Snakefile").write_text("")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "notebook", "exec"), namespace)
    recorded = namespace["rec"].i2t
    assert sorted(recorded) == list(range(6))
    assert all(maps.shape == (1, 1, 256, 77) for maps in recorded.values())
    assert os.path.isfile(tmp_path / "results/models/toy_sd3_random/model_index.json")
