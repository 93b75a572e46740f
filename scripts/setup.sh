#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: system
# packages (etcd, SoftHSM2) and a virtualenv in .venv with the project in it.
# Idempotent and quick when nothing changed.
#
# With BKV_CLUSTER_TESTS=1 (as root; .ci/run sets it) it also builds what the
# real-node tests need, so that no test waits for a build inside its time
# limit: the node's binaries (cold: ~13 min on two cores, then cached in
# /var/cache/bkv-cluster) and every image it runs. The Kubernetes build is
# CPU-bound and runs beside the network-bound steps (pip, debootstrap, the
# images' package downloads). Each phase prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
phase() { echo "setup: [$((SECONDS - t0)) s] $*"; }
cluster=false
if [ "${BKV_CLUSTER_TESTS:-}" = 1 ]; then
  if [ "$(id -u)" = 0 ]; then cluster=true
  else echo "setup: BKV_CLUSTER_TESTS=1 but not root: the real-node tests will be skipped" >&2; fi
fi

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

build_pid=""
if $cluster; then
  bash scripts/cluster-setup.sh
  mkdir -p /var/log/bkv-cluster
  if bash scripts/cluster-build.sh --check >/dev/null 2>&1; then
    phase "the node's binaries are built already"
  else
    phase "building the node's binaries in the background (log: /var/log/bkv-cluster/cluster-build.log)"
    # A process group of its own (a background child is no group leader, so
    # setsid does not fork: $! is the group), ended with setup if setup fails
    # or is interrupted: the build never outlives it.
    setsid bash scripts/cluster-build.sh >/var/log/bkv-cluster/cluster-build.log 2>&1 < /dev/null &
    build_pid=$!
    trap 'if [ -n "$build_pid" ]; then kill -- -"$build_pid" 2>/dev/null || true; fi' EXIT
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bkv-installed
want=$(cat pyproject.toml protocol/pyproject.toml client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  phase "installing the Python package into .venv"
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
  phase "building the Noise processor"
  bash scripts/build-noise-processor.sh "$PWD/.venv/bin/bkv-noise-processor"
  echo "$proc_want" > "$proc_stamp"
fi

if $cluster; then
  # Network-bound while the build runs: the bases and the project's image.
  phase "the node's images that need no built binary"
  bash scripts/cluster-images.sh --no-binaries
  if [ -n "$build_pid" ]; then
    phase "waiting for the node's binaries"
    if ! wait "$build_pid"; then
      build_pid=""; tail -40 /var/log/bkv-cluster/cluster-build.log >&2
      echo "setup: the node's build failed (log above)" >&2; exit 1
    fi
    build_pid=""
    grep -E '^cluster-build: ' /var/log/bkv-cluster/cluster-build.log | sed 's/^/setup:   /'
  fi
  phase "the node's remaining images"
  bash scripts/cluster-images.sh
fi
phase "done"
