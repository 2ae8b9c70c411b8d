#!/usr/bin/env bash
# The linters, as CI runs them: ruff (lint + format check, pyproject.toml [tool.ruff]) over the Python and
# clang-format (.clang-format) over csrc/. Pinned versions: another formatter version can format differently.
#   bash scripts/lint.sh          # check (CI)
#   bash scripts/lint.sh --fix    # apply ruff's fixes and both formatters
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-${VENV:-.venv}/bin/python}
"$PY" -m pip install -q "ruff==0.17.6" "clang-format==23.1.5" 2>&1 | grep -v "^WARNING: Location" || true
BIN=$(dirname "$PY")
CSRC=$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${1:-}" = --fix ]; then
  "$BIN/ruff" check --fix .
  "$BIN/ruff" format .
  echo "$CSRC" | xargs "$BIN/clang-format" --style=file -i
else
  "$BIN/ruff" check .
  "$BIN/ruff" format --check .
  echo "$CSRC" | xargs "$BIN/clang-format" --style=file --dry-run -Werror
  echo "lint: ruff and clang-format clean"
fi
