#!/usr/bin/env bash
# Run the test suite in the environment made by scripts/setup.sh. Extra arguments go to pytest:
#   bash scripts/test.sh                  the full suite (CI)
#   bash scripts/test.sh -m "not slow"    the fast developer run: no fairseq-train/-generate
#                                         subprocesses, no benchmarks (tests marked slow)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "[test] no .venv here: run 'bash scripts/setup.sh' first" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q "$@" tests
