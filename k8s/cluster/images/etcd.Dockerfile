# etcd built from go.etcd.io/etcd/server/v3 (scripts/cluster-build.sh): the
# chart's etcd in the local cluster, which cannot pull quay.io/coreos/etcd.
FROM bkv-base/debian:bookworm
COPY etcd /usr/local/bin/etcd
USER 10001:10001
CMD ["etcd", "--version"]
