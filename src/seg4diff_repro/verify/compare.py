"""Number-by-number comparison of a bundled output with its re-derivation, within a tolerance per quantity.

Tolerances (measured run-to-run and machine-to-machine, docs/verification.md):

* integers (confusion matrices and Hungarian counts in scoring shards, layer, head, image counts, seeds):
  exact;
* percentages in the tables under ``paper_tables/``, printed with two decimals: 0.01, the printed
  resolution: a re-derived value may round the other way;
* other floats (raw score CSVs at full precision, sigma, norms, fidelity scores): 1e-6 absolute plus 1e-6
  relative, far below any reported digit, above the float32/float64 summation-order noise;
* text: exact, except the columns that record which code made the file (``code_version``; ``lora_fingerprint``,
  the content hash of a MAGNET adapter folder whose adapter.json records the commit that trained it), which are
  listed, not compared, since verification runs the current code on purpose (the adapter's effect is compared
  through the scores made with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from seg4diff_repro.verify.layout import is_table

PROVENANCE_COLUMNS = frozenset({"code_version", "lora_fingerprint"})
LORA_SUFFIX = "+lora:"
TABLE_ABS_TOL = 0.01
FLOAT_ABS_TOL = 1e-6
FLOAT_REL_TOL = 1e-6
# Row labels name at most this many identifying columns.
MAX_ROW_KEYS = 4


@dataclass
class Check:
    """One checked quantity: a table cell, a shard array, a checksum, a cache file, a spot-checked map."""

    file: str
    item: str
    bundled: object = None
    rederived: object = None
    paper: object = None
    difference: object = None
    tolerance: str = ""
    passed: bool = True
    note: str = ""

    @property
    def status(self) -> str:
        return "pass" if self.passed else "FAIL"


def _is_integer_column(series: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(series) or pd.api.types.is_bool_dtype(series)


def _row_label(row: pd.Series, frame: pd.DataFrame, index: int) -> str:
    keys = [
        column for column in frame.columns
        if column not in PROVENANCE_COLUMNS and not pd.api.types.is_float_dtype(frame[column])
        and not column.startswith("paper_") and len(str(row[column])) <= 40
    ][:MAX_ROW_KEYS]
    return f"row {index + 1} (" + ", ".join(f"{key}={row[key]}" for key in keys) + ")"


def _plain(value):
    """A JSON-able Python scalar (numpy scalars and NaN become float/None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def compare_csv(path: str, bundled_file: Path, rederived_file: Path, table_tolerance: float = TABLE_ABS_TOL) -> list[Check]:
    """Every cell of the bundled CSV against the re-derived one; the shapes and columns must agree.
    ``table_tolerance``: the allowed difference of a float in a table under ``paper_tables/``."""
    bundled, rederived = pd.read_csv(bundled_file), pd.read_csv(rederived_file)
    if list(bundled.columns) != list(rederived.columns) or len(bundled) != len(rederived):
        return [Check(path, "shape", f"{len(bundled)} rows, columns {list(bundled.columns)}",
                      f"{len(rederived)} rows, columns {list(rederived.columns)}", passed=False,
                      note="the re-derived table has other rows or columns")]
    table = is_table(path)
    checks = []
    for index in range(len(bundled)):
        row_b, row_r = bundled.iloc[index], rederived.iloc[index]
        label = _row_label(row_b, bundled, index)
        for column in bundled.columns:
            value_b, value_r = row_b[column], row_r[column]
            item = f"{label}, {column}"
            paper_column = f"paper_{column}"
            paper = _plain(row_b[paper_column]) if paper_column in bundled.columns else None
            if column in PROVENANCE_COLUMNS:
                checks.append(Check(path, item, _plain(value_b), _plain(value_r), tolerance="not compared",
                                    note="records the code that made it"))
                continue
            numeric = pd.api.types.is_numeric_dtype(bundled[column]) and pd.api.types.is_numeric_dtype(rederived[column])
            if not numeric:
                # A variant's model fingerprint ends in its adapter's (`+lora:`), a provenance hash as above.
                same = (pd.isna(value_b) and pd.isna(value_r)) or (
                    str(value_b).split(LORA_SUFFIX)[0] == str(value_r).split(LORA_SUFFIX)[0])
                tolerance = "exact" if LORA_SUFFIX not in str(value_b) else f"exact before {LORA_SUFFIX}"
                checks.append(Check(path, item, _plain(value_b), _plain(value_r), tolerance=tolerance, passed=same))
                continue
            b, r = float(value_b), float(value_r)
            if math.isnan(b) or math.isnan(r):
                checks.append(Check(path, item, _plain(b), _plain(r), paper, tolerance="both empty",
                                    passed=math.isnan(b) and math.isnan(r)))
                continue
            difference = r - b
            if _is_integer_column(bundled[column]) and _is_integer_column(rederived[column]):
                tolerance, passed = "exact", difference == 0
            elif table:
                tolerance, passed = f"±{table_tolerance:g}", abs(difference) <= table_tolerance + 1e-9
            else:
                allowed = FLOAT_ABS_TOL + FLOAT_REL_TOL * abs(b)
                tolerance, passed = f"±{FLOAT_ABS_TOL:g} + {FLOAT_REL_TOL:g}·|x|", abs(difference) <= allowed
            checks.append(Check(path, item, b, r, paper, difference, tolerance, passed))
    return checks


def compare_npz(path: str, bundled_file: Path, rederived_file: Path) -> list[Check]:
    """Every array of a scoring shard: integer counts exactly, float states (running sums) to 1e-12 relative."""
    with np.load(bundled_file) as b_data, np.load(rederived_file) as r_data:
        if sorted(b_data.files) != sorted(r_data.files):
            return [Check(path, "arrays", sorted(b_data.files), sorted(r_data.files), passed=False)]
        checks = []
        for name in sorted(b_data.files):
            b, r = b_data[name], r_data[name]
            if b.shape != r.shape:
                checks.append(Check(path, name, f"shape {b.shape}", f"shape {r.shape}", passed=False))
                continue
            if np.issubdtype(b.dtype, np.integer) and np.issubdtype(r.dtype, np.integer):
                differing = int((b != r).sum())
                checks.append(Check(
                    path, f"{name} ({b.size} integer cells)", int(b.sum()), int(r.sum()),
                    difference=int(np.abs(r.astype(np.int64) - b.astype(np.int64)).max(initial=0)), tolerance="exact",
                    passed=differing == 0, note=f"{differing} cells differ" if differing else "",
                ))
            else:
                close = np.allclose(r, b, rtol=1e-12, atol=0, equal_nan=True)
                checks.append(Check(path, name, float(b.sum()), float(r.sum()),
                                    difference=float(np.nanmax(np.abs(r - b), initial=0)), tolerance="1e-12 relative",
                                    passed=bool(close)))
    return checks


def compare_shard_folders(path: str, bundled: Path, rederived: Path) -> list[Check]:
    """Scoring shards: the same shards over the same images, and every accumulator state equal."""
    names_b = sorted(p.relative_to(bundled).as_posix() for p in bundled.rglob("*.npz"))
    names_r = sorted(p.relative_to(rederived).as_posix() for p in rederived.rglob("*.npz"))
    if names_b != names_r:
        return [Check(path, "shard files", names_b, names_r, passed=False, note="other shards or accumulators")]
    checks = []
    for shard_json in sorted(bundled.rglob("shard.json")):
        relative = shard_json.relative_to(bundled)
        ids_b = json.loads(shard_json.read_text())["ids"]
        ids_r = json.loads((rederived / relative).read_text())["ids"]
        checks.append(Check(f"{path}/{relative.as_posix()}", "image ids", len(ids_b), len(ids_r), tolerance="exact",
                            passed=ids_b == ids_r))
    for name in names_b:
        checks.extend(compare_npz(f"{path}/{name}", bundled / name, rederived / name))
    return checks


def check_head_scores(path: str, scores_file: Path, shards: Path) -> list[Check]:
    """Streamed per-head scores (appendix Fig. 4), whose maps are never cached: each (layer, head)'s pACC, mACC
    and mIoU in the bundled CSV against the confusion matrices of its bundled shards, merged."""
    from seg4diff_repro.segmentation.metrics import ConfusionMatrixStack

    scores = pd.read_csv(scores_file)
    merged: dict[str, ConfusionMatrixStack] = {}
    for file in sorted(shards.glob("shard_*/layer_*.npz")):
        stack = ConfusionMatrixStack.load(file)
        if file.stem in merged:
            merged[file.stem].merge(stack)
        else:
            merged[file.stem] = stack
    checks = []
    for row in scores.itertuples():
        stack = merged.get(f"layer_{row.layer:03d}")
        if stack is None:
            checks.append(Check(path, f"layer {row.layer}", "scored", "no shards", passed=False))
            continue
        computed = stack[row.head].compute()
        for metric in ("pACC", "mACC", "mIoU"):
            bundled, derived = float(getattr(row, metric)), computed[metric]
            allowed = FLOAT_ABS_TOL + FLOAT_REL_TOL * abs(bundled)
            checks.append(Check(path, f"layer {row.layer}, head {row.head}, {metric}", bundled, derived,
                                difference=derived - bundled, tolerance=f"±{FLOAT_ABS_TOL:g} + {FLOAT_REL_TOL:g}·|x|",
                                passed=abs(derived - bundled) <= allowed, note="from the bundled shards"))
    return checks
