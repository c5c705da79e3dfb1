#!/usr/bin/env bash
# Runs the whole suite. A run that collects no test is a failure.
#
# As root with no arguments (`make test`, CI), it then runs the user pass: the tiers that do not
# need root, again, as an ordinary user (scripts/run-user-tests.sh). Set KERNEL_USER_PASS=0 to
# leave it out; with arguments, only pytest runs (with those arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "run-tests: pytest collected no test: failing" >&2
  rc=1
fi
if [ $# -eq 0 ] && [ "$(id -u)" = 0 ] && [ "${KERNEL_USER_PASS:-1}" != 0 ]; then
  echo "run-tests: the user pass (the tiers that do not need root, as an ordinary user)" >&2
  start=$(date +%s)
  scripts/run-user-tests.sh
  urc=$?
  echo "run-tests: the user pass took $(( $(date +%s) - start )) s (exit $urc)" >&2
  [ "$rc" != 0 ] || rc=$urc
fi
exit "$rc"
