#!/usr/bin/env bash
# Second README command: install (if needed) and run the test suite. -rs prints why a test was skipped, --durations
# the slowest tests (where the suite's time goes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m pytest -rs --durations=20 "$@"
