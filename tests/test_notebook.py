"""notebooks/attention_recorder.ipynb: executed by a Jupyter kernel in a copy of the checkout, it runs, reads the
pipeline's folders without writing into them (or works in a temporary folder without them), and is stored with
its outputs and a kernelspec."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks/attention_recorder.ipynb"
PIPELINE_FOLDERS = ("data", "results", "figures", "paper_tables")
# Appended to the executed copy: what the notebook computed, for the assertions below.
REPORT_CELL = (
    "import json\n"
    "print('REPORT ' + json.dumps({'data_dir': str(data_dir), 'layers': sorted(rec.i2t),"
    " 'shapes': sorted({tuple(m.shape) for m in rec.i2t.values()}), 'miou': curve['mIoU'].to_dict(),"
    " 'best': best, 'images': len(samples), 'cache_dir': str(cache_manifest.parent),"
    " 'cache_image': cached.image_id, 'cache_map': cache_map.tolist()}))"
)
CACHE_CELL_TAG = "pipeline-cache"  # the cell that opens an attention cache with the package's reader


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
    report = json.loads(text.split("REPORT ", 1)[1])
    (cache_cell,) = [c for c in notebook.cells if CACHE_CELL_TAG in c.metadata.get("tags", [])]
    report["cache_cell_text"] = "".join(o.get("text", "") for o in cache_cell.outputs)
    report["cache_cell_pngs"] = sum("image/png" in o.get("data", {}) for o in cache_cell.outputs)
    return report


def check_what_it_computed(report: dict) -> None:
    assert report["layers"] == list(range(6))
    assert report["shapes"] == [[1, 1, 256, 77]]  # batch, head mean, 16x16 image tokens, 77 CLIP positions
    miou = {int(layer): value for layer, value in report["miou"].items()}
    # The toy model's finding (README, paper_tables/toy_world_grounding_t8.md): layer 0 grounds the class words.
    assert report["best"] == 0 and miou[0] > 90 and max(v for k, v in miou.items() if k) < 60


def cached_map(cache_dir: Path, image_id: str, layer: int = 0, class_index: int = 0) -> np.ndarray:
    """The notebook's cache map recomputed from the .npz's arrays directly (not through read_cached_image), in
    float64: the head-mean I2T map of the prompt's ``class_index``-th class at ``layer``."""
    with np.load(cache_dir / f"{image_id}.npz") as data:
        start, end = np.searchsorted(data["columns"], data["spans"][class_index])
        maps = data["i2t"][list(data["layers"]).index(layer)].astype(np.float64)
        return maps[:, start:end].mean(-1).reshape(tuple(data["token_grid"]))


def test_without_a_pipeline_run_it_works_in_a_temporary_folder_and_creates_no_pipeline_folder(tmp_path):
    root = checkout_copy(tmp_path / "checkout")
    report = execute(root)
    check_what_it_computed(report)
    assert report["images"] == 16
    assert not Path(report["data_dir"]).is_relative_to(root)
    # The cache cell extracted its own cache into a temporary folder and showed a map read from it.
    cache_dir = Path(report["cache_dir"])
    assert not cache_dir.is_relative_to(root) and "extracted into" in report["cache_cell_text"]
    assert report["cache_cell_pngs"] == 1
    np.testing.assert_allclose(report["cache_map"], cached_map(cache_dir, report["cache_image"]), atol=1e-6)
    assert [folder for folder in PIPELINE_FOLDERS if (root / folder).exists()] == []


def test_it_reads_the_pipelines_data_scores_and_attention_cache_and_changes_nothing_there(tmp_path):
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.datasets import generate_toy_shapes

    root = checkout_copy(tmp_path / "checkout")
    generate_toy_shapes(root / "data/prepared/toy_shapes", n_train=1, n_val=6, seed=3)
    scores = root / "results/segmentation/toy_sd3/toy_shapes/t8/per_layer.csv"
    scores.parent.mkdir(parents=True)
    scores.write_text("layer,mIoU\n" + "".join(f"{layer},{50 - layer}\n" for layer in range(6)))
    # The pipeline's t = 8 cache of the toy model, as its extraction rule writes it (2 images, all layers).
    cache_dir = root / "results/attention/toy_sd3/toy_shapes_object/t8"
    extract_attention(ExtractionSettings(
        model="toy_sd3", dataset="toy_shapes_object", backbone="sd3", source=str(root / "models/toy_sd3"),
        dtype="float32", timestep=8, num_steps=28, layers=None, seed=0, short_side=None, resize="stretch",
        prompt="oracle", background_name="background", split="val", background="ignore", limit=2,
    ), root / "data/prepared/toy_shapes", cache_dir)
    before = snapshot(root)
    assert {"results/attention/toy_sd3/toy_shapes_object/t8/manifest.json",
            "results/attention/toy_sd3/toy_shapes_object/t8/toy_val_00000.npz"} <= set(before)
    report = execute(root)
    check_what_it_computed(report)
    assert report["data_dir"] == str(root / "data/prepared/toy_shapes") and report["images"] == 6
    # The cache cell opened the pipeline's cache and showed the map its first image's file holds.
    assert report["cache_dir"] == str(cache_dir) and report["cache_image"] == "toy_val_00000"
    assert "the pipeline's, results/attention/toy_sd3/toy_shapes_object/t8" in report["cache_cell_text"]
    assert report["cache_cell_pngs"] == 1
    np.testing.assert_allclose(report["cache_map"], cached_map(cache_dir, "toy_val_00000"), atol=1e-6)
    assert snapshot(root) == before  # every file's bytes and mtime, the cache's included


def test_the_stored_notebook_has_a_kernelspec_and_the_outputs_of_every_code_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] and cell["execution_count"] for cell in code)
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for cell in code for o in cell["outputs"]) >= 3
