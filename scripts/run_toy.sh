#!/usr/bin/env bash
# First README command: install, then run the default pipeline on the offline toy world and write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Snakemake's own temp folder too: a killed run leaves it behind, here rather than in /tmp.
export TMPDIR="${TMPDIR:-$PWD/.cache/tmp}"
mkdir -p "$TMPDIR"
snakemake --cores "${CORES:-2}" "$@"
snakemake --cores 1 --report report.html
echo "Done: see paper_tables/, figures/ and report.html"
