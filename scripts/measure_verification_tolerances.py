"""Measure the differences verification must tolerate (docs/verification.md): re-derivation on this machine, and a
full re-extraction of every cache of a bundle on each device given, scored into the bundle's tables.

    cd <workflow folder with the models>; python scripts/measure_verification_tolerances.py BUNDLE --devices cpu cuda \
        --out measured.json

For each device: the largest difference between re-extracted and cached maps (absolute, and relative to the
cached value), and what the re-extracted caches do to the tables: the largest difference of a table number,
how many table cells and confusion-matrix cells change. Prints a summary; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from seg4diff_repro.attention.cache import read_cached_image
from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
from seg4diff_repro.verify.bundle import sha256_file
from seg4diff_repro.verify.verify import verify_bundle


def _number_differences(verification) -> dict:
    """Largest |re-derived − bundled| of table cells, raw-score cells, and changed counts, over passing or not."""
    table = raw = 0.0
    changed_cells = changed_counts = 0
    for check in verification.sections.get("Re-derived numbers", []):
        if not isinstance(check.difference, (int, float)) or check.difference is None:
            continue
        difference = abs(float(check.difference))
        if "integer cells" in check.item:
            changed_counts += int(check.note.split()[0]) if check.note else 0
        elif check.file.startswith("paper_tables/"):
            table = max(table, difference)
            changed_cells += difference > 0
        else:
            raw = max(raw, difference)
    return {"max_table_difference": table, "table_cells_changed": changed_cells, "max_raw_score_difference": raw,
            "confusion_counts_changed": changed_counts, "failures": len(verification.failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    measured = {"rederived_here": _number_differences(verify_bundle(bundle))}
    print("re-derivation from the bundled caches:", measured["rederived_here"])
    for device in args.devices:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "bundle"
            shutil.copytree(bundle, copy)
            maps = {}
            for job in (j for j in manifest["jobs"] if "cache_folder" in j):
                folder = bundle / "files" / job["cache_folder"]
                cache = json.loads((folder / "manifest.json").read_text())
                local = cache["inputs"]["model_fingerprint"].startswith("sha256:")  # a folder, not a hub id
                if local and not Path(cache["settings"]["source"]).is_dir():  # relative folders resolve here
                    print(f"skipping {job['cache_folder']}: its model {cache['settings']['source']} is not here")
                    continue
                settings = ExtractionSettings.from_dict(cache["settings"])
                fresh = Path(scratch) / job["cache_folder"]
                argv = job["argv"]
                dataset = bundle / "files" / argv[argv.index("--dataset-root") + 1]
                extract_attention(settings, dataset, fresh, device=device, batch_size=8)
                absolute, relative = 0.0, 0.0
                for image_id in cache["image_ids"]:
                    old, new = read_cached_image(folder, image_id), read_cached_image(fresh, image_id)
                    for a, b in ((old.i2t, new.i2t), (old.logits, new.logits)):
                        a64, b64 = a.astype(np.float64), b.astype(np.float64)
                        absolute = max(absolute, float(np.abs(a64 - b64).max()))
                        relative = max(relative, float((np.abs(a64 - b64) / (np.abs(a64) + 1e-3)).max()))
                    target = copy / "files" / job["cache_folder"] / f"{image_id}.npz"
                    shutil.copyfile(fresh / f"{image_id}.npz", target)
                    relative_path = f"{job['cache_folder']}/{image_id}.npz"
                    manifest_copy = json.loads((copy / "bundle.json").read_text())
                    manifest_copy["files"][relative_path]["sha256"] = sha256_file(target)
                    (copy / "bundle.json").write_text(json.dumps(manifest_copy))
                maps[job["cache_folder"]] = {"max_abs": absolute, "max_rel_to_abs_plus_1e-3": relative,
                                             "dtype": settings.dtype}
            tables = _number_differences(verify_bundle(copy))
        measured[device] = {"maps": maps, "tables": tables}
        print(f"re-extracted on {device}: maps {maps}\n  tables {tables}")
    Path(args.out).write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
