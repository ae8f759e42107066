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
    " 'best': best, 'analysis_layer': ANALYSIS_LAYER, 'images': len(samples), 'classes': dataset.class_names,"
    " 'cache_dir': str(cache_manifest.parent), 'cache_image': cached.image_id, 'cache_layer': cache_layer,"
    " 'cache_map': cache_map.tolist()}))"
)
CACHE_CELL_TAG = "pipeline-cache"  # the cell that opens an attention cache with the package's reader


def checkout_copy(root: Path) -> Path:
    """The parts of the checkout the notebook reads: the Snakefile (its marker of the root), config.yaml (the
    model's analysis layer), the trained model and the notebook; the package comes from the installed copy."""
    root.mkdir()
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
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
    assert report["layers"] == list(range(12))
    assert report["shapes"] == [[1, 1, 1024, 77]]  # batch, head mean, 32x32 image tokens, 77 CLIP positions
    # The VOC20 view: the objects preset's six shapes, background dropped from the vocabulary.
    assert report["classes"] == ["circle", "square", "triangle", "star", "cross", "ring"]
    miou = {int(layer): value for layer, value in report["miou"].items()}
    # The toy model's finding (benchmarks/RESULTS.md, "One-shot trainings"): layer 5, config.yaml's analysis layer,
    # tells the shapes apart best, far above the median layer (64 and 37 mIoU on 64 images; noisier on the few here).
    assert report["analysis_layer"] == 5 and report["cache_layer"] == 5
    assert report["best"] == 5 and miou[5] > 45 and miou[5] > np.median(list(miou.values())) + 15


def cached_map(cache_dir: Path, image_id: str, layer: int, class_index: int = 0) -> np.ndarray:
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
    assert report["cache_map"] and np.asarray(report["cache_map"]).shape == (32, 32)
    np.testing.assert_allclose(report["cache_map"], cached_map(cache_dir, report["cache_image"], report["cache_layer"]),
                               atol=1e-6)
    assert [folder for folder in PIPELINE_FOLDERS if (root / folder).exists()] == []


def test_it_reads_the_pipelines_data_scores_and_attention_cache_and_changes_nothing_there(tmp_path):
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.datasets.toy_world import generate_toy_world

    root = checkout_copy(tmp_path / "checkout")
    prepared = root / "data/prepared"
    generate_toy_world(prepared / "toy_world_objects", preset="objects", n_train=1, n_val=6, seed=3)
    generate_toy_world(prepared / "toy_world_crowd", preset="crowd", n_train=1, n_val=2, seed=3)
    scores = root / "results/segmentation/toy_sd3/toy_objects/t8/per_layer.csv"
    scores.parent.mkdir(parents=True)
    scores.write_text("layer,mIoU\n" + "".join(f"{layer},{50 - layer}\n" for layer in range(12)))
    # The pipeline's t = 8 caches of the toy model on the VOC20 and COCO-Object views, as its extraction rule
    # writes them (2 images, all layers): the notebook must pick the VOC20 view's, though toy_crowd sorts first.
    caches = {}
    for view, preset, background in (("toy_crowd", "crowd", "ignore"), ("toy_objects", "objects", "drop")):
        caches[view] = root / f"results/attention/toy_sd3/{view}/t8"
        extract_attention(ExtractionSettings(
            model="toy_sd3", dataset=view, backbone="sd3", source=str(root / "models/toy_sd3"),
            dtype="float32", timestep=8, num_steps=28, layers=None, seed=0, short_side=None, resize="stretch",
            prompt="oracle", background_name="background", split="val", background=background, limit=2,
        ), prepared / f"toy_world_{preset}", caches[view])
    before = snapshot(root)
    assert {f"results/attention/toy_sd3/{view}/t8/{name}" for view in caches
            for name in ("manifest.json", "toy_val_00000.npz")} <= set(before)
    report = execute(root)
    check_what_it_computed(report)
    assert report["data_dir"] == str(prepared / "toy_world_objects") and report["images"] == 6
    # The cache cell opened the pipeline's VOC20-view cache and showed the map its first image's file holds.
    cache_dir = caches["toy_objects"]
    assert report["cache_dir"] == str(cache_dir) and report["cache_image"] == "toy_val_00000"
    assert "the pipeline's, results/attention/toy_sd3/toy_objects/t8" in report["cache_cell_text"]
    assert report["cache_cell_pngs"] == 1
    layer = report["cache_layer"]
    assert not np.allclose(cached_map(cache_dir, "toy_val_00000", layer), cached_map(caches["toy_crowd"], "toy_val_00000", layer))
    np.testing.assert_allclose(report["cache_map"], cached_map(cache_dir, "toy_val_00000", layer), atol=1e-6)
    assert snapshot(root) == before  # every file's bytes and mtime, the cache's included


def test_the_stored_notebook_has_a_kernelspec_and_the_outputs_of_every_code_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] and cell["execution_count"] for cell in code)
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for cell in code for o in cell["outputs"]) >= 3
