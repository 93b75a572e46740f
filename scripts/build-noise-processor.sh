#!/usr/bin/env bash
# Builds the Noise processor (services/edge/noise-processor, Go) into $1 from
# Debian's Go packages only -- GOPATH mode, no module download -- so that the
# local fleet, CI and the image build it the same way offline:
#   apt-get install golang-go golang-google-grpc-dev golang-github-flynn-noise-dev golang-golang-x-crypto-dev
set -euo pipefail
out=${1:?usage: build-noise-processor.sh OUTPUT}
src="$(cd "$(dirname "$0")/../services/edge/noise-processor" && pwd)"
mkdir -p "$(dirname "$out")"
cd "$src"
# Static, no cgo: the binary runs in any image.
export GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0
# Go keeps its build cache under $HOME; a CI runner or an image build may have none.
[ -n "${GOCACHE:-}${XDG_CACHE_HOME:-}${HOME:-}" ] || export GOCACHE=/tmp/bkv-go-build
go vet .
go test -count=1 .  # its own unit tests (the replay window); the black-box ones are tests/test_edge_processor.py
go build -trimpath -ldflags=-s -o "$out.tmp" .
mv "$out.tmp" "$out"
