# CoreDNS built from github.com/coredns/coredns (scripts/cluster-build.sh).
FROM bkv-base/debian:bookworm
COPY coredns /usr/local/bin/coredns
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/coredns"]
