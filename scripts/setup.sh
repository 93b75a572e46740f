#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: system
# packages (etcd, SoftHSM2) and a virtualenv in .venv with the project in it.
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: the dashboards test scrapes the local fleet with the real one.
# Go is not among them: the Noise processor is a Go module that needs a newer
# Go than Debian's (scripts/build-noise-processor.sh says which, and stops
# with a clear message without it).
APT_PACKAGES=(etcd-server softhsm2 prometheus)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's etcd-server package starts a system etcd on 2379; we run our own.
# Likewise Prometheus on 9090: the tests run their own.
for svc in etcd prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
# `kubectl kustomize` renders the dev overlay in the chart tests. Debian has no
# kubectl package; these machines ship one. Elsewhere: https://kubernetes.io/docs/tasks/tools/
command -v kubectl >/dev/null 2>&1 || echo "setup: kubectl not found; the kustomize test will fail until it is installed" >&2

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bkv-installed
want=$(cat pyproject.toml protocol/pyproject.toml client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the Python package into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # Three distributions from this checkout: the protocol, the client, the
  # services with their dev tooling (docs/architecture.md, "Packages").
  .venv/bin/pip install -q -e ./protocol -e ./client -e '.[dev]'
  echo "$want" > "$stamp"
fi

# The Noise processor (Go) beside the interpreter, rebuilt when its sources change.
proc_stamp=.venv/.bkv-noise-processor
proc_want=$(cat services/edge/noise-processor/*.go services/edge/noise-processor/go.mod \
                services/edge/noise-processor/go.sum scripts/build-noise-processor.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/bkv-noise-processor ] || [ ! -f "$proc_stamp" ] || [ "$(cat "$proc_stamp")" != "$proc_want" ]; then
  echo "setup: building the Noise processor"
  bash scripts/build-noise-processor.sh "$PWD/.venv/bin/bkv-noise-processor"
  echo "$proc_want" > "$proc_stamp"
fi
