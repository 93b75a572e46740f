#!/usr/bin/env bash
# Loads locally built images from Docker into the node's containerd
# (namespace k8s.io, where the kubelet's CRI looks): there is no registry, so
# the kubelet never pulls. An image already loaded with the same id is skipped.
#   scripts/cluster-load.sh [IMAGE...]   (default: every image the node runs)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-env.sh
CTR="ctr -a $BKV_CONTAINERD_SOCK -n k8s.io"
mkdir -p "$BKV_RUN/loaded"
images=${*:-bkv:dev bkv-base/debian:bookworm bkv-local/pause:dev bkv-local/envoy:dev bkv-local/etcd:dev bkv-local/coredns:dev bkv-local/local-path:dev}
for one in $images; do
    id=$($DOCKER image inspect -f '{{.Id}}' "$one")
    case $one in */*) ref=docker.io/$one;; *) ref=docker.io/library/$one;; esac
    mark=$BKV_RUN/loaded/$(echo "$one" | tr '/:' '__')
    if [ "$(cat "$mark" 2>/dev/null)" = "$id" ] && [ -n "$($CTR images ls -q "name==$ref")" ]; then
        continue
    fi
    echo "cluster-load: $one"
    $DOCKER save "$one" | $CTR images import -
    echo "$id" > "$mark"
done
