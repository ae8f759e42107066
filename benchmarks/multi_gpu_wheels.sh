#!/usr/bin/env bash
# Wheels that benchmarks/multi_gpu.sh needs on the GPU machine (its image has torch, transformers,
# huggingface_hub, pandas, matplotlib ... but not snakemake, diffusers or open_clip_torch): run here, where pip
# reaches PyPI; they land in .whl/ (ignored by git; carry it). Versions are CI's (constraints/ci.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
names="snakemake snakemake-interface-common snakemake-interface-executor-plugins snakemake-interface-logger-plugins
snakemake-interface-report-plugins snakemake-interface-scheduler-plugins snakemake-interface-storage-plugins
diffusers open_clip_torch ftfy wcwidth pycocotools jsonschema jsonschema-specifications referencing rpds-py
annotated-types argparse-dataclass conda-inject ConfigArgParse connection_pool docutils dpath fastjsonschema gitdb
GitPython smmap humanfriendly immutables importlib_metadata jupyter_core nbformat platformdirs PuLP pydantic
pydantic_core typing-inspection smart_open SQLAlchemy sqlmodel greenlet tenacity throttler traitlets truststore yte
lazy-importer httpx2 httpcore2"
mkdir -p .whl
for name in $names; do
    pin=$(grep -i -E "^${name}==" constraints/ci.txt || true)
    [ -n "$pin" ] || { echo "no pin for $name in constraints/ci.txt" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pin" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$pin"  # published as source only (pure Python): build it
done
du -sh .whl
