#!/usr/bin/env bash
# Runs the whole suite. A run that collects no test is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "run-tests: pytest collected no test: failing" >&2
  exit 1
fi
exit "$rc"
