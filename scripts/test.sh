#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run the test suite against the compiled ops.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
# The suite must exercise the compiled kernels, never the reference fallback.
"$VENV/bin/python" -c "import sys, rslad_fast; sys.exit(rslad_fast.ops.backend() != 'compiled')" || {
  echo "error: rslad_fast._C did not build; the tests would only exercise the reference fallback" >&2; exit 1; }
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
