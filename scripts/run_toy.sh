#!/usr/bin/env bash
# First README command: install, then run the default pipeline on the offline toy world and write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --cores "${CORES:-2}" "$@"
snakemake --cores 1 --report report.html
echo "Done: see paper_tables/, figures/ and report.html"
