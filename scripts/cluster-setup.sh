#!/usr/bin/env bash
# The system packages the one-node cluster needs, from Debian (run by
# cluster-up.sh; idempotent): Docker's engine to build the images, containerd
# and runc for the node, the CNI plugins (bridge, host-local, portmap,
# loopback), debootstrap for the base image, iptables for kube-proxy.
# Go (to build Kubernetes, etcd and CoreDNS from their modules) is the
# machine's /usr/local/go, or GO=/path/to/go.
set -euo pipefail
APT_PACKAGES=(docker.io containerd runc containernetworking-plugins debootstrap iptables conntrack openssl curl gcc libc6-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "cluster-setup: installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
GO=${GO:-/usr/local/go/bin/go}
[ -x "$GO" ] || { echo "cluster-setup: Go not found at $GO (set GO=...); it builds Kubernetes from its module" >&2; exit 1; }
# The kubelet refuses to start without these on a cgroup v1 machine.
for c in cpu memory pids; do
  [ -d "/sys/fs/cgroup/$c" ] || [ -f /sys/fs/cgroup/cgroup.controllers ] \
    || { echo "cluster-setup: no cgroup controller $c" >&2; exit 1; }
done
