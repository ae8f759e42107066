"""Write what `configs/rehearsal.yaml` reads: random-weight pipelines and small raw copies of the datasets.

    python benchmarks/rehearsal_setup.py --root rehearsal                 # released sizes, drawn on the GPU
    python benchmarks/rehearsal_setup.py --root rehearsal --size tiny     # the toy sizes, for a CPU dry rehearsal

Models (`save_pretrained` folders, loaded by the same `from_pretrained` path as the hub ids): SD3-medium,
SD3.5-medium and FLUX.1-dev at their released configurations (`seg4diff_repro.models.released`), as
<root>/models/{sd3_medium_random, sd35_medium_random, flux_dev_random}. Datasets: <root>/raw/<name> for each
evaluation set, in the release's layout (`seg4diff_repro.datasets.rehearsal`), which the pipeline's prepare
rules read through `data.paths`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from seg4diff_repro.datasets.rehearsal import REHEARSAL_DATASETS, write_rehearsal_dataset

MODELS = {"sd3_medium_random": "sd3", "sd35_medium_random": "sd35", "flux_dev_random": "flux"}


def write_models(root: Path, size: str, device: str) -> dict[str, float]:
    seconds = {}
    for name, variant in MODELS.items():
        start = time.perf_counter()
        if size == "released":
            from seg4diff_repro.models.released import write_released_random_pipeline

            write_released_random_pipeline(root / name, variant, dtype="float16", device=device)
        elif variant == "flux":
            from seg4diff_repro.models.tiny_flux import write_tiny_flux_pipeline

            write_tiny_flux_pipeline(root / name)
        else:
            from seg4diff_repro.models.tiny import TINY_SD35_CONFIG, TinySD3Config, write_tiny_sd3_pipeline

            write_tiny_sd3_pipeline(root / name, config=TINY_SD35_CONFIG if variant == "sd35" else TinySD3Config())
        seconds[name] = time.perf_counter() - start
        print(f"{name}: written in {seconds[name]:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("rehearsal"))
    parser.add_argument("--size", choices=["released", "tiny"], default="released")
    parser.add_argument("--device", default="cuda", help="where the released-size weights are drawn")
    parser.add_argument("--images", type=int, default=3, help="val images per dataset")
    args = parser.parse_args()
    for name in REHEARSAL_DATASETS:
        write_rehearsal_dataset(name, args.root / "raw" / name, n_images=args.images)
    seconds = write_models(args.root / "models", args.size, args.device)
    sizes = {name: sum(p.stat().st_size for p in (args.root / "models" / name).rglob("*") if p.is_file())
             for name in MODELS}
    (args.root / "setup.json").write_text(json.dumps({"size": args.size, "write_seconds": seconds,
                                                      "bytes": sizes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
