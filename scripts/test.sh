#!/usr/bin/env bash
# Runs the whole test suite. pytest's exit 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "test: no tests were collected" >&2; exit 1; fi
exit "$rc"
