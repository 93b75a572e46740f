#!/usr/bin/env bash
# `make cluster-down`: removes the one-node cluster: every pod and container,
# every daemon cluster-up started (by the pids it kept), mounts, the bridge,
# the routes and iptables rules, the node's state and .bkv-cluster/.
# Kept for the next `make cluster`: the built binaries and Go caches
# (/var/cache/bkv-cluster) and the images in Docker. --purge removes those too.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-env.sh
purge=false; [ "${1:-}" = --purge ] && purge=true

pid_of() { cat "$BKV_RUN/$1.pid" 2>/dev/null; }
stop() {  # stop NAME: TERM, then KILL after 15 s
    local pid; pid=$(pid_of "$1") || return 0
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { rm -f "$BKV_RUN/$1.pid"; return 0; }
    echo "cluster-down: stopping $1"
    kill "$pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$BKV_RUN/$1.pid"
}

# The kubelet first, so nothing restarts what is being removed.
stop kubelet
CTR="ctr -a $BKV_CONTAINERD_SOCK -n k8s.io"
if [ -S "$BKV_CONTAINERD_SOCK" ] && $CTR version >/dev/null 2>&1; then
    netns=()
    for c in $($CTR containers ls -q); do
        # A pod sandbox's network namespace (made by containerd's CRI for the CNI).
        ns=$($CTR containers info "$c" 2>/dev/null | python3 -c '
import json, sys
try:
    spec = json.load(sys.stdin)["Spec"]
    print(next((n.get("path", "") for n in spec["linux"]["namespaces"] if n["type"] == "network"), ""))
except Exception:
    pass')
        [ -n "$ns" ] && netns+=("$ns")
    done
    for t in $($CTR tasks ls -q); do $CTR tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1; done
    for _ in $(seq 20); do [ -z "$($CTR tasks ls -q | head -1)" ] && break; sleep 0.5; $CTR tasks ls -q | while read -r t; do $CTR tasks rm -f "$t" >/dev/null 2>&1; done; done
    for c in $($CTR containers ls -q); do $CTR containers rm "$c" >/dev/null 2>&1; done
    for ns in "${netns[@]}"; do
        case $ns in /var/run/netns/cni-*|/run/netns/cni-*) umount "$ns" 2>/dev/null; rm -f "$ns";; esac
    done
fi
if ! { [ -S "$BKV_CONTAINERD_SOCK" ] && $CTR version >/dev/null 2>&1; } && [ -d "$BKV_STATE/containerd" ]; then
    # Our containerd was ended without us (a session's processes killed): the
    # pod network namespaces it made (CRI names them cni-*) are left mounted.
    for ns in /var/run/netns/cni-*; do [ -e "$ns" ] && { umount "$ns" 2>/dev/null; rm -f "$ns"; }; done
fi
stop containerd
# Shims of our containerd only (they name its socket), by pid.
for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "-address $BKV_CONTAINERD_SOCK "; then
        kill -9 "${p#/proc/}" 2>/dev/null
    fi
done
# Whatever still runs in the node's pod cgroups (containers whose runtime was
# ended under them): only our kubelet makes /kubepods.
for _ in $(seq 20); do
    pids=$(cat $(find /sys/fs/cgroup/pids/kubepods -name cgroup.procs 2>/dev/null) 2>/dev/null)
    [ -z "$pids" ] && break
    kill -9 $pids 2>/dev/null; sleep 0.5
done
for h in /sys/fs/cgroup/*/kubepods; do
    [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
done
stop kube-proxy
[ -x "$BKV_BIN/kube-proxy" ] && "$BKV_BIN/kube-proxy" --cleanup >/dev/null 2>&1
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd

# Mounts the kubelet and containerd left (volumes, rootfs, shm), deepest first.
for root in "$BKV_STATE" "$BKV_RUN"; do
    awk -v r="$root" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
done

# The kubelet's own chains (kube-proxy --cleanup leaves them).
for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
        $ipt -t "$table" -D INPUT -j KUBE-FIREWALL 2>/dev/null
        $ipt -t "$table" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null
        for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
            $ipt -t "$table" -F "$chain" 2>/dev/null && $ipt -t "$table" -X "$chain" 2>/dev/null
        done
    done
done
for dir in -i -o; do
    while iptables -D FORWARD $dir "$BKV_BRIDGE" -j ACCEPT -m comment --comment bkv-cluster 2>/dev/null; do :; done
done
ip route del "$BKV_SERVICE_CIDR" 2>/dev/null
ip link del "$BKV_BRIDGE" 2>/dev/null
rm -rf /var/lib/cni/networks/bkv "$BKV_STATE" "$BKV_KUBEDIR"

if [ -f "$BKV_RUN/dockerd.pid" ]; then stop dockerd; fi
rm -rf "$BKV_RUN"
if $purge; then
    echo "cluster-down: purging the build cache and the local images"
    $DOCKER info >/dev/null 2>&1 && $DOCKER image rm -f bkv:dev bkv-local/envoy:dev bkv-local/etcd:dev \
        bkv-local/coredns:dev bkv-local/local-path:dev bkv-local/pause:dev bkv-base/python:3.11 \
        bkv-base/debian:bookworm >/dev/null 2>&1
    rm -rf "$BKV_CLUSTER_CACHE"
fi
echo "cluster-down: done"
