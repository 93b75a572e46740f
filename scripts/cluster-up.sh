#!/usr/bin/env bash
# `make cluster`: a one-node Kubernetes on this machine from the official
# components, then the chart installed into it (docs/kubernetes.md, "A real
# node on this machine"). Idempotent: a node already up is left running.
#   scripts/cluster-up.sh            node + image + chart (make cluster)
#   scripts/cluster-up.sh --node     the node only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-env.sh
[ "$(id -u)" = 0 ] || { echo "cluster-up: run as root (it starts a kubelet)" >&2; exit 1; }
only_node=false; [ "${1:-}" = --node ] && only_node=true

t0=$SECONDS
# A node left by a session whose processes were ended (state on disk, no
# API server): remove it first, rather than start on its stale mounts.
if [ -d "$BKV_STATE" ] && ! { [ -f "$BKV_RUN/kube-apiserver.pid" ] && kill -0 "$(cat "$BKV_RUN/kube-apiserver.pid")" 2>/dev/null; }; then
    echo "cluster-up: removing a node that is no longer running"
    bash scripts/cluster-down.sh
fi
bash scripts/cluster-setup.sh
bash scripts/cluster-build.sh
bash scripts/cluster-images.sh
mkdir -p "$BKV_STATE" "$BKV_RUN" "$BKV_KUBEDIR"

running() { [ -f "$BKV_RUN/$1.pid" ] && kill -0 "$(cat "$BKV_RUN/$1.pid")" 2>/dev/null; }
start() {  # start NAME CMD...: a daemon of the node, logged, its pid kept for cluster-down
    local name=$1; shift
    running "$name" && return 0
    echo "cluster-up: starting $name"
    setsid "$@" >"$BKV_LOG/$name.log" 2>&1 < /dev/null &
    echo $! > "$BKV_RUN/$name.pid"
}

# --- network: the bridge every pod sits on; node, API server and kubelet use its address
if ! ip link show "$BKV_BRIDGE" >/dev/null 2>&1; then
    ip link add "$BKV_BRIDGE" type bridge
fi
ip addr replace "$BKV_NODE_IP/24" dev "$BKV_BRIDGE"
ip link set "$BKV_BRIDGE" up
# Service addresses are routed onto the bridge: nothing for them ever leaves by eth0.
ip route replace "$BKV_SERVICE_CIDR" dev "$BKV_BRIDGE" src "$BKV_NODE_IP"
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
# dockerd sets FORWARD's policy to DROP: let pod traffic on the bridge through.
for dir in -i -o; do
    iptables -C FORWARD $dir "$BKV_BRIDGE" -j ACCEPT -m comment --comment bkv-cluster 2>/dev/null \
        || iptables -I FORWARD $dir "$BKV_BRIDGE" -j ACCEPT -m comment --comment bkv-cluster
done

# --- PKI: one CA, a certificate per component
P=$BKV_STATE/pki
if [ ! -f "$P/.done" ]; then
    mkdir -p "$P"; cd "$P"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=bkv-cluster-ca" 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    cert() {  # cert NAME SUBJECT [SANs]
        openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
        local ext; ext=$(mktemp)
        printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' > "$ext"
        [ -n "${3:-}" ] && echo "subjectAltName=$3" >> "$ext"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 -extfile "$ext" 2>/dev/null
        rm -f "$1.csr" "$ext"
    }
    cert apiserver "/CN=kube-apiserver" "IP:$BKV_NODE_IP,IP:$BKV_KUBE_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    cert admin "/O=system:masters/CN=bkv-admin"
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cert kubelet "/O=system:nodes/CN=system:node:$BKV_NODE_NAME" "IP:$BKV_NODE_IP,DNS:$BKV_NODE_NAME"
    cert kube-proxy "/CN=system:kube-proxy"
    for who in admin controller-manager scheduler kubelet kube-proxy; do
        KUBECONFIG=$who.kubeconfig kubectl config set-cluster bkv --server="https://$BKV_NODE_IP:6443" \
            --certificate-authority=ca.crt --embed-certs >/dev/null
        KUBECONFIG=$who.kubeconfig kubectl config set-credentials "$who" --client-certificate="$who.crt" \
            --client-key="$who.key" --embed-certs >/dev/null
        KUBECONFIG=$who.kubeconfig kubectl config set-context bkv --cluster=bkv --user="$who" >/dev/null
        KUBECONFIG=$who.kubeconfig kubectl config use-context bkv >/dev/null
    done
    chmod 600 ./*.key ./*.kubeconfig
    touch .done; cd - >/dev/null
fi
install -m 600 "$P/admin.kubeconfig" "$BKV_KUBEDIR/kubeconfig"

# --- control plane
start etcd "$BKV_BIN/etcd" --name bkv-node --data-dir "$BKV_STATE/etcd" \
    --listen-client-urls "http://$BKV_ETCD_CLIENT" --advertise-client-urls "http://$BKV_ETCD_CLIENT" \
    --listen-peer-urls "http://$BKV_ETCD_PEER" --initial-advertise-peer-urls "http://$BKV_ETCD_PEER" \
    --initial-cluster "bkv-node=http://$BKV_ETCD_PEER" --listen-metrics-urls http://127.0.0.1:23810 --log-level warn
bkv_wait 60 curl -fsS http://127.0.0.1:23810/health

start kube-apiserver "$BKV_BIN/kube-apiserver" \
    --etcd-servers "http://$BKV_ETCD_CLIENT" --bind-address "$BKV_NODE_IP" --advertise-address "$BKV_NODE_IP" \
    --secure-port 6443 --service-cluster-ip-range "$BKV_SERVICE_CIDR" \
    --tls-cert-file "$P/apiserver.crt" --tls-private-key-file "$P/apiserver.key" --client-ca-file "$P/ca.crt" \
    --kubelet-client-certificate "$P/apiserver-kubelet-client.crt" --kubelet-client-key "$P/apiserver-kubelet-client.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$P/sa.pub" --service-account-signing-key-file "$P/sa.key" \
    --kubelet-preferred-address-types InternalIP \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --allow-privileged=true \
    --profiling=false --v=1
bkv_wait 120 kc get --raw /readyz

start kube-controller-manager "$BKV_BIN/kube-controller-manager" \
    --kubeconfig "$P/controller-manager.kubeconfig" --authentication-kubeconfig "$P/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$P/controller-manager.kubeconfig" --bind-address 127.0.0.1 \
    --service-account-private-key-file "$P/sa.key" --root-ca-file "$P/ca.crt" \
    --cluster-signing-cert-file "$P/ca.crt" --cluster-signing-key-file "$P/ca.key" \
    --use-service-account-credentials --leader-elect=false --service-cluster-ip-range "$BKV_SERVICE_CIDR" \
    --profiling=false --v=1
start kube-scheduler "$BKV_BIN/kube-scheduler" --kubeconfig "$P/scheduler.kubeconfig" \
    --authentication-kubeconfig "$P/scheduler.kubeconfig" --authorization-kubeconfig "$P/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1

# --- container runtime: Debian's containerd (its own instance, not dockerd's) and runc
mkdir -p "$BKV_STATE/cni/net.d" "$BKV_RUN/containerd"
sed -e "s#@STATE@#$BKV_STATE#g" -e "s#@RUN@#$BKV_RUN#g" -e "s#@SOCK@#$BKV_CONTAINERD_SOCK#g" \
    k8s/cluster/containerd.toml > "$BKV_STATE/containerd.toml"
sed -e "s#@BRIDGE@#$BKV_BRIDGE#g" -e "s#@POD_CIDR@#$BKV_POD_CIDR#g" -e "s#@GW@#$BKV_NODE_IP#g" \
    k8s/cluster/cni.conflist > "$BKV_STATE/cni/net.d/10-bkv.conflist"
start containerd containerd --config "$BKV_STATE/containerd.toml"
bkv_wait 60 ctr -a "$BKV_CONTAINERD_SOCK" version

# Load the local images into the node (no registry: the kubelet never pulls).
bash scripts/cluster-load.sh

# --- node
mkdir -p "$BKV_STATE/kubelet"
sed -e "s#@P@#$P#g" -e "s#@NODE_IP@#$BKV_NODE_IP#g" -e "s#@DNS_IP@#$BKV_DNS_IP#g" \
    -e "s#@SOCK@#$BKV_CONTAINERD_SOCK#g" -e "s#@POD_CIDR@#$BKV_POD_CIDR#g" \
    k8s/cluster/kubelet.yaml > "$BKV_STATE/kubelet/config.yaml"
start kubelet "$BKV_BIN/kubelet" --config "$BKV_STATE/kubelet/config.yaml" --kubeconfig "$P/kubelet.kubeconfig" \
    --root-dir "$BKV_STATE/kubelet" --hostname-override "$BKV_NODE_NAME" --node-ip "$BKV_NODE_IP" --v=1
# Rewritten only if it changed: a running kube-proxy exits when its
# configuration file is written (a second cluster-up on a node that is up).
sed -e "s#@P@#$P#g" -e "s#@POD_CIDR@#$BKV_POD_CIDR#g" -e "s#@NODE@#$BKV_NODE_NAME#g" \
    k8s/cluster/kube-proxy.yaml > "$BKV_STATE/kube-proxy.yaml.new"
if cmp -s "$BKV_STATE/kube-proxy.yaml.new" "$BKV_STATE/kube-proxy.yaml"; then
    rm "$BKV_STATE/kube-proxy.yaml.new"
else
    mv "$BKV_STATE/kube-proxy.yaml.new" "$BKV_STATE/kube-proxy.yaml"
fi
start kube-proxy "$BKV_BIN/kube-proxy" --config "$BKV_STATE/kube-proxy.yaml" --v=1

bkv_wait 180 sh -c "kubectl --kubeconfig '$P/admin.kubeconfig' get node $BKV_NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"

# --- add-ons: CoreDNS (cluster DNS) and the local-path provisioner (default StorageClass)
for f in k8s/cluster/addons/*.yaml; do
    sed -e "s#@STATE@#$BKV_STATE#g" -e "s#@DNS_IP@#$BKV_DNS_IP#g" "$f"
    echo ---
done | kc apply -f - >/dev/null
kc -n kube-system rollout status deployment/coredns --timeout=180s
kc -n local-path-storage rollout status deployment/local-path-provisioner --timeout=180s
echo "cluster-up: node ready in $((SECONDS - t0)) s; kubeconfig: $BKV_KUBEDIR/kubeconfig"

$only_node && exit 0
bash scripts/cluster-install.sh
echo "cluster-up: done in $((SECONDS - t0)) s"
