#!/bin/bash
# The HSM floor of commits, alternated (docs/performance.md): bench.py's in-process
# VaultHsm steps against the real SoftHSM2 token, each commit from its own worktree
# and sources in this venv.   usage: bash loadtest/floor_ab.sh ROUNDS REV...
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rounds=$1; shift
tmp=$(mktemp -d /tmp/bkv-floor-XXXX)
trap 'for r in "$@"; do git -C "$ROOT" worktree remove --force "$tmp/wt-$r" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
for r in "$@"; do git -C "$ROOT" worktree add -q --detach "$tmp/wt-$r" "$r"; done
for i in $(seq "$rounds"); do
    for r in "$@"; do
        wt=$tmp/wt-$r; path=""
        for s in protocol/src client/src src services/frontend services/vault-island services/hsm-proxy services/edge services/witness; do
            path="$path:$wt/$s"
        done
        (cd "$wt" && PYTHONPATH=${path#:} "$ROOT/.venv/bin/python" loadtest/bench.py --scenarios guess --duration 2 \
            --seed-users 4 --no-half --out "$tmp/out-$r-$i" > "$tmp/out-$r-$i.log" 2>&1)
        "$ROOT/.venv/bin/python" -c "import json; f = json.load(open('$tmp/out-$r-$i/bench.json'))['floor']['hsm']; \
print('round $i', '$r', {k: round(v * 1000, 3) for k, v in f.items()}, 'ms')"
    done
done
