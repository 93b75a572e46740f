#!/usr/bin/env bash
# Runs the whole test suite. pytest's exit 5 (no tests collected) is a failure.
# The fifteen slowest tests are listed at the end (--durations), with the
# suite's own time.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
echo "test: pytest took $((SECONDS - t0)) s"
if [ "$rc" = 5 ]; then echo "test: no tests were collected" >&2; exit 1; fi
exit "$rc"
