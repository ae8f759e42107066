"""notebooks/attention_recorder.ipynb: executed by a Jupyter kernel in a copy of the checkout, it runs, reads the
pipeline's folders without writing into them (or works in a temporary folder without them), and is stored with
its outputs and a kernelspec."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks/attention_recorder.ipynb"
PIPELINE_FOLDERS = ("data", "results", "figures", "paper_tables")
# Appended to the executed copy: what the notebook computed, for the assertions below.
REPORT_CELL = (
    "import json\n"
    "print('REPORT ' + json.dumps({'data_dir': str(data_dir), 'layers': sorted(rec.i2t),"
    " 'shapes': sorted({tuple(m.shape) for m in rec.i2t.values()}), 'miou': curve['mIoU'].to_dict(),"
    " 'best': best, 'images': len(samples)}))"
)


def checkout_copy(root: Path) -> Path:
    """The parts of the checkout the notebook reads: the Snakefile (its marker of the root), the trained model
    and the notebook; the package comes from the installed copy."""
    root.mkdir()
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    shutil.copytree(REPO / "models/toy_sd3", root / "models/toy_sd3")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
        for folder in PIPELINE_FOLDERS
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def execute(root: Path) -> dict:
    notebook = nbformat.read(root / "notebooks/attention_recorder.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    return json.loads(text.split("REPORT ", 1)[1])


def check_what_it_computed(report: dict) -> None:
    assert report["layers"] == list(range(6))
    assert report["shapes"] == [[1, 1, 256, 77]]  # batch, head mean, 16x16 image tokens, 77 CLIP positions
    miou = {int(layer): value for layer, value in report["miou"].items()}
    # The toy model's finding (README, paper_tables/toy_world_grounding_t8.md): layer 0 grounds the class words.
    assert report["best"] == 0 and miou[0] > 90 and max(v for k, v in miou.items() if k) < 60


def test_without_a_pipeline_run_it_works_in_a_temporary_folder_and_creates_no_pipeline_folder(tmp_path):
    root = checkout_copy(tmp_path / "checkout")
    report = execute(root)
    check_what_it_computed(report)
    assert report["images"] == 16
    assert not Path(report["data_dir"]).is_relative_to(root)
    assert [folder for folder in PIPELINE_FOLDERS if (root / folder).exists()] == []


def test_it_reads_the_pipelines_data_and_scores_and_changes_nothing_there(tmp_path):
    from seg4diff_repro.datasets import generate_toy_shapes

    root = checkout_copy(tmp_path / "checkout")
    generate_toy_shapes(root / "data/prepared/toy_shapes", n_train=1, n_val=6, seed=3)
    scores = root / "results/segmentation/toy_sd3/toy_shapes/t8/per_layer.csv"
    scores.parent.mkdir(parents=True)
    scores.write_text("layer,mIoU\n" + "".join(f"{layer},{50 - layer}\n" for layer in range(6)))
    before = snapshot(root)
    report = execute(root)
    check_what_it_computed(report)
    assert report["data_dir"] == str(root / "data/prepared/toy_shapes") and report["images"] == 6
    assert snapshot(root) == before


def test_the_stored_notebook_has_a_kernelspec_and_the_outputs_of_every_code_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] and cell["execution_count"] for cell in code)
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for cell in code for o in cell["outputs"]) >= 3
