#!/usr/bin/env bash
# Builds the node's binaries from source, once per machine, into a cache
# outside the work tree (BKV_CLUSTER_CACHE, default /var/cache/bkv-cluster):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
#   kube-proxy, kubectl   from the k8s.io/kubernetes module at K8S_VERSION
#   etcd         from go.etcd.io/etcd/server/v3 (its etcdmain, as etcd's own main)
#   coredns      from github.com/coredns/coredns
# Every binary is built only if missing: a warm run costs nothing.
# scripts/setup.sh runs it (with BKV_CLUSTER_TESTS=1) before any test starts;
# --check says whether anything is left to build.
#
# Why Kubernetes v1.34: these machines run cgroup v1. From v1.35 the kubelet
# refuses cgroup v1 unless failCgroupV1 is false, and upstream has announced
# the removal of cgroup v1 support altogether; v1.34 is the newest release in
# which cgroup v1 is still a supported (maintenance-mode) configuration, and it
# still accepts containerd 1.6 (Debian bookworm's). The kubelet config sets
# failCgroupV1: false explicitly anyway, so the choice is written down twice.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
CACHE=${BKV_CLUSTER_CACHE:-/var/cache/bkv-cluster}
GO=${GO:-/usr/local/go/bin/go}
BIN=$CACHE/bin/$K8S_VERSION
export GOMODCACHE=$CACHE/gomod GOCACHE=$CACHE/gocache GOFLAGS=-mod=mod GOTOOLCHAIN=local
export CGO_ENABLED=0
# More compile jobs than cores: under nice 19 on a busy machine each gets a
# sliver; on an idle one it costs nothing.
export GOFLAGS="$GOFLAGS -p=${BKV_BUILD_JOBS:-4}"
[ "${1:-}" = --check ] || mkdir -p "$BIN" "$CACHE/src"
# Heavy builds yield to everything else on the machine.
NICE="nice -n 19"

need() { for b in "$@"; do [ -x "$BIN/$b" ] || return 0; done; return 1; }
ALL=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd coredns local-path-provisioner pause)
# --check: exit 0 if every binary is built, 1 if a build is needed (builds nothing).
if [ "${1:-}" = --check ]; then
    if need "${ALL[@]}"; then echo "cluster-build: not built yet in $BIN" >&2; exit 1; fi
    exit 0
fi

if need kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; then
    echo "cluster-build: Kubernetes $K8S_VERSION (cold build, several minutes)"
    json=$($GO mod download -json "k8s.io/kubernetes@$K8S_VERSION")
    dir=$(printf '%s' "$json" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
    src=$CACHE/src/kubernetes-$K8S_VERSION
    if [ ! -f "$src/.ready" ]; then
        rm -rf "$src"; cp -r "$dir" "$src"; chmod -R u+w "$src"
        # The module's go.mod points its staging modules (k8s.io/api, ...)
        # at ./staging, which a module zip does not carry: take the published
        # staging modules of the same release (v0.X.Y for v1.X.Y) instead.
        stage=v0.${K8S_VERSION#v1.}
        (cd "$src" && rm -f go.work go.work.sum \
          && for m in $(sed -n 's/^\s*\(k8s.io\/[a-z0-9-]*\) => .*/\1/p' go.mod); do
                 $GO mod edit -dropreplace="$m" -require="$m@$stage"; done)
        touch "$src/.ready"
    fi
    major=${K8S_VERSION#v}; minor=${major#*.}; minor=${minor%%.*}; major=${major%%.*}
    pkg=k8s.io/component-base/version
    ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor \
-X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        [ -x "$BIN/$b" ] && continue
        echo "cluster-build: $b"
        (cd "$src" && $NICE $GO build -trimpath -ldflags "$ldflags" -o "$BIN/$b.tmp" "./cmd/$b")
        mv "$BIN/$b.tmp" "$BIN/$b"
    done
fi

if need etcd; then
    echo "cluster-build: etcd $ETCD_VERSION"
    e=$CACHE/src/etcd-$ETCD_VERSION; mkdir -p "$e"
    cat > "$e/main.go" <<'GO'
// etcd's own main (go.etcd.io/etcd/v3's main.go): the server's etcdmain.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$e" && { [ -f go.mod ] || $GO mod init bkv.local/etcd >/dev/null 2>&1; } \
      && $GO get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null \
      && $NICE $GO build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .)
    mv "$BIN/etcd.tmp" "$BIN/etcd"
fi

# BINARY from the Go module MODULE at VERSION, its source kept in $CACHE/src/STEM-VERSION
# (a writable copy of the module cache's read-only one).
build_module() {
    local binary=$1 module=$2 version=$3 src=$CACHE/src/$4-$3 json dir
    echo "cluster-build: $binary $version"
    if [ ! -f "$src/.ready" ]; then
        json=$($GO mod download -json "$module@$version")
        dir=$(printf '%s' "$json" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
        rm -rf "$src"; cp -r "$dir" "$src"; chmod -R u+w "$src"; touch "$src/.ready"
    fi
    (cd "$src" && $NICE $GO build -trimpath -ldflags "-s -w" -o "$BIN/$binary.tmp" .)
    mv "$BIN/$binary.tmp" "$BIN/$binary"
}

if need coredns; then
    build_module coredns github.com/coredns/coredns "$COREDNS_VERSION" coredns
fi

LOCAL_PATH_VERSION=${LOCAL_PATH_VERSION:-v0.0.30}
if need local-path-provisioner; then
    build_module local-path-provisioner github.com/rancher/local-path-provisioner "$LOCAL_PATH_VERSION" local-path
fi

# The pod sandbox ("pause") from the Kubernetes source itself: the image
# registry.k8s.io/pause cannot be pulled here.
if need pause; then
    echo "cluster-build: pause"
    p=$($GO mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c
    gcc -Os -static -DVERSION="$K8S_VERSION" -o "$BIN/pause.tmp" "$p" && strip "$BIN/pause.tmp"
    mv "$BIN/pause.tmp" "$BIN/pause"
fi
echo "cluster-build: all binaries in $BIN"
