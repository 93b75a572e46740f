# The pod sandbox: pause.c from the Kubernetes source (scripts/cluster-build.sh),
# as registry.k8s.io/pause is built, which cannot be pulled here.
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
