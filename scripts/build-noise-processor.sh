#!/usr/bin/env bash
# Builds the Noise processor (services/edge/noise-processor, a Go module)
# into $1: go vet, its own unit tests, then a static binary. Modules come
# from the Go module proxy (GOPROXY) and the go command checks each against
# the committed go.sum; go.mod is never rewritten (-mod=readonly, the
# default). The same script serves scripts/setup.sh (into .venv/bin) and
# the image's Go stage.
set -euo pipefail
out=${1:?usage: build-noise-processor.sh OUTPUT}
src="$(cd "$(dirname "$0")/../services/edge/noise-processor" && pwd)"

# Go keeps its build cache under $HOME/.cache and its modules under
# $HOME/go; a CI runner or an image build may have no HOME.
if [ -z "${HOME:-}" ]; then
  [ -n "${GOCACHE:-}${XDG_CACHE_HOME:-}" ] || export GOCACHE=/tmp/bkv-go-build
  [ -n "${GOPATH:-}" ] || export GOPATH=/tmp/bkv-go
  [ -n "${GOMODCACHE:-}" ] || export GOMODCACHE="$GOPATH/pkg/mod"
fi
# The Go that go.mod asks for, or a clear refusal (not a compiler error later).
want=$(sed -n 's/^go \([0-9][0-9.]*\).*/\1/p' "$src/go.mod")
if ! command -v go >/dev/null 2>&1; then
  echo "build-noise-processor: no \`go\` on PATH; the Noise processor needs Go >= $want (https://go.dev/dl/)" >&2
  exit 1
fi
# Asked inside the module: a Go >= 1.21 with GOTOOLCHAIN=auto (or go1.X) switches
# to the toolchain go.mod needs, fetched from the module proxy, and reports that.
have=$(cd "$src" && go env GOVERSION 2>/dev/null | sed -n 's/^go\([0-9][0-9.]*\).*/\1/p') || true
if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" != "$want" ]; then
  echo "build-noise-processor: $(command -v go) is $(go version 2>/dev/null | cut -d' ' -f3 || echo 'an unknown Go');" \
       "go.mod requires Go >= $want (install it, or with Go >= 1.21 set GOTOOLCHAIN=go$want to fetch it)" >&2
  exit 1
fi

# Static, no cgo: the binary runs in any image. The vtprotobuf tag compiles
# go-control-plane's generated marshallers (extproc.go).
export CGO_ENABLED=0 GO111MODULE=on
tags=vtprotobuf
mkdir -p "$(dirname "$out")"
cd "$src"
go vet -tags "$tags" ./...
go test -tags "$tags" -count=1 ./...  # its own unit tests; the black-box ones are tests/test_edge_processor.py
go build -tags "$tags" -trimpath -ldflags=-s -o "$out.tmp" .
mv "$out.tmp" "$out"
