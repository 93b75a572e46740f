#!/usr/bin/env bash
# Installs (or upgrades) charts/backup-key-vault with values-dev.yaml on the
# local node through Helm's own engine (helm-python-sdk), waits until every
# pod is Ready, then points the bkv CLI at it (`bkv dev cluster`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-env.sh
bash scripts/cluster-load.sh bkv:dev
.venv/bin/python k8s/cluster/install.py install "$@"
.venv/bin/python k8s/cluster/install.py client
