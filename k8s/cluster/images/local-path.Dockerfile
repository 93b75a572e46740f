# Rancher's local-path provisioner built from its module (scripts/cluster-build.sh).
# Its helper pods (mkdir/rm of a volume's directory) run this image too: it has a shell.
FROM bkv-base/debian:bookworm
COPY local-path-provisioner /usr/local/bin/local-path-provisioner
ENTRYPOINT ["/usr/local/bin/local-path-provisioner"]
