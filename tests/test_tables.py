"""Tables put our numbers beside the paper's: the right rows, the right paper values, the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from seg4diff_repro.cli import main
from seg4diff_repro.generation.fidelity import score_run
from seg4diff_repro.provenance import provenance
from seg4diff_repro.tables.per_layer import per_layer_table
from seg4diff_repro.tables.sweeps import normalisation_table, timestep_sweep_table, unsupervised_table
from seg4diff_repro.tables.toy_world import grounding_summary, write_grounding_summary


def per_layer_scores(model: str, k: int, miou_by_layer: list[float], overflow_images: int = 0) -> pd.DataFrame:
    return pd.DataFrame({
        "model": model, "dataset": "voc20", "layer": range(len(miou_by_layer)), "pACC": 90.0, "mACC": 80.0,
        "mIoU": miou_by_layer, "mIoU_overflow_official": miou_by_layer,
        "mIoU_overflow_corrected": [m + 1.0 for m in miou_by_layer], "overflow_images": overflow_images,
        "timestep_k": k, "sigma": 0.5, "images": 3,
    })


def test_prompt_overflow_columns_appear_labelled_when_some_prompt_overflowed():
    plain = per_layer_table(per_layer_scores("toy", 8, [50.0, 60.0]), None, None)
    assert not any("overflow" in column for column in plain.columns)  # nothing to show when no prompt overflowed
    table = per_layer_table(per_layer_scores("toy", 8, [50.0, 60.0], overflow_images=2), None, None)
    assert table["mIoU (official, >75-token prompts: NaN maps win)"].tolist() == [50.0, 60.0]
    assert table["mIoU (corrected, >75-token prompts)"].tolist() == [51.0, 61.0]
    sweep = timestep_sweep_table([per_layer_scores("toy", 8, [50.0, 60.0], overflow_images=2)], 1, None, None)
    assert sweep["mIoU (corrected, >75-token prompts)"].tolist() == [61.0]


def test_unsupervised_table_shows_both_matchings_labelled():
    scores = pd.DataFrame({
        "model": "sd3_medium", "dataset": "voc21", "layer": [9], "timestep_k": 8, "kl_threshold": 0.1,
        "geometry": "official", "background": "last", "scored_classes": 21, "mean_proposals": 7.0,
        "matching": "per_row", "pACC": 70.0, "mIoU": 55.0, "mIoU_per_row": 55.0, "mIoU_per_image": 40.0,
    })
    table = unsupervised_table(scores, 9, "sd3_medium", "voc21")
    assert table.loc[0, "mIoU (official, per-row matching)"] == 55.0
    assert table.loc[0, "mIoU (corrected, per-image)"] == 40.0
    assert table.loc[0, "paper_mIoU"] == 54.9 and table.loc[0, "diff_mIoU"] == pytest.approx(0.1)


def test_per_layer_table_puts_the_paper_value_on_its_layer_only():
    table = per_layer_table(per_layer_scores("sd3_medium", 8, [50.0] * 24), "sd3_medium", "voc20")
    assert table.loc[9, "paper_mIoU"] == 89.2  # main Table 1, SD3, VOC20, layer 9
    assert table["paper_mIoU"].drop(index=9).isna().all()
    assert table.loc[9, "diff_mIoU"] == pytest.approx(50.0 - 89.2)
    other_k = per_layer_table(per_layer_scores("sd3_medium", 7, [50.0] * 24), "sd3_medium", "voc20")
    assert other_k["paper_mIoU"].isna().all()  # the paper's number is for t = 8 only


def test_timestep_sweep_picks_the_layer_and_the_best_k():
    scores = [per_layer_scores("sd3_medium", k, [10.0 * k + layer for layer in range(24)]) for k in (12, 4, 8)]
    scores[2].loc[9, "mIoU"] = 500.0
    table = timestep_sweep_table(scores, 9, "sd3_medium", "voc20")
    assert table["timestep_k"].tolist() == [4, 8, 12]
    assert table["mIoU"].tolist() == [49.0, 500.0, 129.0]
    assert (table["best_k"] == 8).all() and (table["paper_best_k"] == 8).all()
    assert table.set_index("timestep_k")["paper_mIoU"].isna().tolist() == [True, False, True]
    with pytest.raises(ValueError, match="layer 30 was not recorded"):
        timestep_sweep_table(scores, 30, None, None)


def test_normalisation_table_pairs_each_setting_with_its_paper_row():
    variants = {
        (softmax, minmax): per_layer_scores("sd3_medium", 8, [float(10 * softmax + minmax)] * 24)
        for softmax in (False, True) for minmax in (False, True)
    }
    table = normalisation_table(variants, 9, "sd3_medium", "coco_object").set_index(["post_softmax", "min_max"])
    assert table.loc[(True, False), "paper_mIoU"] == 61.8
    assert table.loc[(False, True), "paper_mIoU"] == 53.5
    assert table.loc[(True, True), "mIoU"] == 11.0
    assert normalisation_table(variants, 9, None, None)["paper_mIoU"].isna().all()


def unsupervised_scores(mean_proposals: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"model": "toy_sd3", "dataset": "toy_stuff", "layer": range(len(mean_proposals)),
                         "kl_threshold": 0.1, "mean_proposals": mean_proposals})


def test_grounding_summary_applies_the_toy_world_thresholds():
    control = per_layer_scores("toy_sd3_random", 8, [30.0, 35.0, 32.0, 31.0])
    trained = per_layer_scores("toy_sd3", 8, [30.0, 90.0, 40.0, 35.0])
    summary = grounding_summary(trained, control, unsupervised_scores([1.5, 2.5]))
    assert summary.loc[0, "best_layer"] == 1 and summary.loc[1, "best_layer"] == 1
    assert summary.loc[0, "best_minus_control_best"] == pytest.approx(55.0)
    assert summary.loc[0, "best_minus_median"] == pytest.approx(52.5)
    assert summary.loc[0, "mean_proposals"] == pytest.approx(2.0)
    checks = summary.loc[0, "checks"]
    assert "interior: pass" in checks and "55.00 >= 25: pass" in checks and "52.50 >= 15: pass" in checks
    assert "2.00 > 1: pass" in checks and "FAIL" not in checks
    # the first layer is not interior; 24 over the control and 14 over the median fall short; one proposal is not more
    edge = grounding_summary(per_layer_scores("toy_sd3", 8, [59.0, 45.0, 40.0, 50.0]), control, unsupervised_scores([1.0]))
    checks = edge.loc[0, "checks"]
    assert "best layer 0 of 0..3 interior: FAIL" in checks
    assert "24.00 not >= 25: FAIL" in checks and "11.50 not >= 15: FAIL" in checks and "1.00 not > 1: FAIL" in checks
    assert grounding_summary(trained, control)["mean_proposals"].isna().all()


# --- every table records the code that made it: version, code fingerprint, commit and dirty flag -----------------


def assert_names_the_code(text: str, stage: str = "package") -> None:
    """``text`` names the version, the stage's code fingerprint and the commit with its dirty flag, as
    seg4diff_repro.provenance reports them for this checkout."""
    record = provenance(stage)
    assert record["package_version"] in text and record["code_fingerprint"] in text
    if record["commit"] is None:
        assert "no git commit" in text
    else:
        assert f"commit {record['commit'][:10]}" in text
        assert ("(dirty)" in text) == record["dirty"]


def test_toy_world_summary_records_the_code_that_made_it(tmp_path):
    trained, control = tmp_path / "trained.csv", tmp_path / "control.csv"
    per_layer_scores("toy_sd3", 8, [90.0, 30.0, 40.0]).to_csv(trained, index=False)
    per_layer_scores("toy_sd3_random", 8, [30.0, 35.0, 32.0]).to_csv(control, index=False)
    unsupervised = tmp_path / "toy_stuff" / "t8" / "scores.csv"
    unsupervised.parent.mkdir(parents=True)
    unsupervised_scores([1.5]).to_csv(unsupervised, index=False)
    write_grounding_summary(trained, control, tmp_path / "summary.csv", tmp_path / "summary.md", unsupervised)
    assert f"unsupervised scores, toy_stuff ({unsupervised})" in (tmp_path / "summary.md").read_text()
    table = pd.read_csv(tmp_path / "summary.csv")
    for code_version in table["code_version"]:
        assert_names_the_code(code_version)
    assert_names_the_code((tmp_path / "summary.md").read_text())


class StubScorer:
    """Stands in for the CLIP and DINO backbones: a score that falls with the mean pixel difference."""

    backbones = {"clip_backbone": "stub", "dino_backbone": "stub", "fidelity_weights": "random",
                 "clip_fingerprint": None, "dino_fingerprint": None}

    def score(self, images, references, prompts):
        return [{"clip_i": 1.0 - float(np.abs(image.astype(float) - reference).mean()) / 255, "clip_t": 0.3,
                 "dino": 0.5} for image, reference in zip(images, references)]


TOY_FINGERPRINT = "sha256:" + "5" * 64  # what generate-run records of the model that made a run's images


def write_generation_run(folder: Path, run: str, layer: int | None, shade: int) -> None:
    """A run folder as generate-run writes it (manifest.json and PNGs): 2 prompts x 1 seed of 8x8 images."""
    folder.mkdir(parents=True)
    images = []
    for index, prompt in enumerate(("A red car.", "A dog.")):
        name = f"p{index:03d}_s0.png"
        Image.fromarray(np.full((8, 8, 3), shade + index, dtype=np.uint8)).save(folder / name)
        images.append({"file": name, "prompt_index": index, "prompt": prompt, "seed": 0})
    manifest = {
        "run": {"model": "toy_sd3", "run": run, "backbone": "sd3", "seeds": [0], "source": "models/toy_sd3",
                "revision": None},
        "model_fingerprint": TOY_FINGERPRINT,
        "mode": "perturb" if layer is not None else "none", "layer": layer,
        "sampling": {"blur_sigma": 10.0, "blur_kernel": 9, "cfg": 7.5, "steps": 28},
        "height": 8, "width": 8, "n_prompts": 2, "provenance": provenance("generation"), "images": images,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_fidelity_scores_and_table_record_the_code_that_made_them(tmp_path):
    write_generation_run(tmp_path / "none", "none", None, 100)
    write_generation_run(tmp_path / "perturb_l0", "perturb_l0", 0, 140)
    scores = pd.concat([score_run(tmp_path / run, tmp_path / "none", StubScorer()) for run in ("none", "perturb_l0")])
    for code_version in scores["code_version"]:
        assert_names_the_code(code_version)
    scores.to_csv(tmp_path / "scores.csv", index=False)
    outputs = {name: tmp_path / f"fig05.{'md' if name == 'markdown' else name}"
               for name in ("csv", "markdown", "png", "pdf")}
    main(["fidelity-figure", "--scores", str(tmp_path / "scores.csv"), "--reference", str(tmp_path / "none"),
          "--role", "sd3", "--figure", "fig05",
          *[arg for name, path in outputs.items() for arg in (f"--{name}", str(path))]])
    table = pd.read_csv(outputs["csv"])
    assert table["run"].tolist() == ["none", "perturb_l0"]
    assert table["clip_i_mean"].tolist() == pytest.approx([1.0, 1.0 - 40 / 255], abs=1e-4)  # 40 grey levels apart
    for code_version in table["code_version"]:
        assert_names_the_code(code_version)
    assert table["model_fingerprint"].tolist() == [TOY_FINGERPRINT] * 2  # the generating model, from the manifests
    markdown = outputs["markdown"].read_text()
    assert f"toy_sd3 standing in for SD3-medium ({TOY_FINGERPRINT})" in markdown
    scored, _, generated = markdown.partition("images generated by")
    assert_names_the_code(scored)  # the scoring code
    assert_names_the_code(generated, "generation")  # the code that made the images (the run's manifest)


def test_a_table_heading_names_the_outputs_folder_it_is_written_to(tmp_path):
    """A table under paper_tables/<outputs>/ says whose outputs it is in its title, as figures do in their footer."""
    from seg4diff_repro.tables import heading

    assert heading("Main Table 1", tmp_path / "paper_tables" / "toy" / "main_table1.md") == "# Main Table 1 (toy outputs)\n\n"
    assert heading("Main Table 1", tmp_path / "paper_tables" / "paper" / "t.md").startswith("# Main Table 1 (paper outputs)")
    assert heading("Main Table 1", tmp_path / "elsewhere" / "t.md") == "# Main Table 1\n\n"
