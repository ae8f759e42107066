"""Tables put our numbers beside the paper's: the right rows, the right paper values, the provenance."""

from __future__ import annotations

import pandas as pd
import pytest

from seg4diff_repro.tables.per_layer import per_layer_table
from seg4diff_repro.tables.sweeps import normalisation_table, timestep_sweep_table
from seg4diff_repro.tables.toy_world import grounding_summary


def per_layer_scores(model: str, k: int, miou_by_layer: list[float]) -> pd.DataFrame:
    return pd.DataFrame({
        "model": model, "dataset": "voc20", "layer": range(len(miou_by_layer)), "pACC": 90.0, "mACC": 80.0,
        "mIoU": miou_by_layer, "timestep_k": k, "sigma": 0.5, "images": 3,
    })


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


def test_grounding_summary_applies_the_toy_world_thresholds():
    trained = per_layer_scores("toy_sd3", 8, [90.0, 30.0, 40.0, 35.0])
    control = per_layer_scores("toy_sd3_random", 8, [30.0, 35.0, 32.0, 31.0])
    summary = grounding_summary(trained, control)
    assert summary.loc[0, "best_layer"] == 0 and summary.loc[1, "best_layer"] == 1
    assert summary.loc[0, "best_minus_control_best"] == pytest.approx(55.0)
    assert summary.loc[0, "best_minus_median"] == pytest.approx(52.5)
    assert "55.0 >= 20" in summary.loc[0, "checks"]
    weak = grounding_summary(per_layer_scores("toy_sd3", 8, [40.0, 30.0, 35.0]), control)
    assert "5.0 < 20" in weak.loc[0, "checks"]
