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
# The committed toy tables, as committed, before the run rewrites them (a default run only, in a git checkout).
committed=""
if [ $# -eq 0 ] && git ls-files --error-unmatch paper_tables/toy >/dev/null 2>&1; then
    committed=$(mktemp -d)
    trap 'rm -rf "$committed"' EXIT
    git archive HEAD paper_tables/toy | tar -x -C "$committed"
    # A fresh checkout gives Snakemake no record of how its files were made: a committed output whose inputs are
    # not newer (Fig. 1 has none) would count as up to date. Remove them, so that this run makes every one.
    git ls-files -z figures/toy paper_tables/toy | xargs -0 rm -f
fi
snakemake --cores "${CORES:-2}" "$@"
snakemake --cores 1 --report report.html
echo "Done: see paper_tables/, figures/ and report.html"
if [ -n "$committed" ]; then
    # Every number of the committed tables, reproduced within the re-run tolerance (docs/verification.md).
    seg4diff-repro compare-outputs --committed "$committed/paper_tables/toy" --fresh paper_tables/toy \
        --markdown results/compare_committed_toy.md
fi
