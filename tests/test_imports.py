"""The CPU stages (scoring, tables, figures) do not import diffusers or transformers: every such job would pay
about 10 s of imports on a small CPU (the toy run has about 50 of them, the paper run hundreds)."""

from __future__ import annotations

import json
import subprocess
import sys

CPU_STAGE_MODULES = [
    "seg4diff_repro.segmentation.score",
    "seg4diff_repro.segmentation.unsupervised",
    "seg4diff_repro.segmentation.overlays",
    "seg4diff_repro.cli_segmentation_appendix",
    "seg4diff_repro.tables.per_layer",
    "seg4diff_repro.tables.segmentation_appendix",
    "seg4diff_repro.figures.per_layer",
    "seg4diff_repro.figures.segmentation_appendix",
]


def test_cpu_stage_modules_import_no_model_library():
    # Imported one after another: the first module that pulls in a model library is the one named.
    probe = (
        "import importlib, json, sys\n"
        "found = {}\n"
        "for module in sys.argv[1:]:\n"
        "    before = {'diffusers', 'transformers'} & set(sys.modules)\n"
        "    importlib.import_module(module)\n"
        "    found[module] = sorted(({'diffusers', 'transformers'} & set(sys.modules)) - before)\n"
        "print(json.dumps(found))"
    )
    result = subprocess.run([sys.executable, "-c", probe, *CPU_STAGE_MODULES], capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == set(CPU_STAGE_MODULES)
    assert {module: names for module, names in found.items() if names} == {}


def test_gathering_extraction_shards_imports_no_torch():
    """A gather job (one per attention cache, 24 in the toy run) only reads records and cache keys: without torch it
    starts in a fraction of a second instead of the 2-3 s torch's import takes."""
    probe = (
        "import sys\n"
        "from seg4diff_repro.attention.shards import gather_shards\n"
        "import seg4diff_repro.cli\n"
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
