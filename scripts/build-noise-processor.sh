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
# Debian's go (1.19) may come first on PATH; the official install in
# /usr/local/go is tried too.
want=$(sed -n 's/^go \([0-9][0-9.]*\).*/\1/p' "$src/go.mod")
go_version() {  # asked inside the module: a Go >= 1.21 may switch toolchains (GOTOOLCHAIN)
  (cd "$src" && "$1" env GOVERSION 2>/dev/null | sed -n 's/^go\([0-9][0-9.]*\).*/\1/p') || true
}
GO=""
for cand in "$(command -v go || true)" /usr/local/go/bin/go; do
  [ -n "$cand" ] && [ -x "$cand" ] || continue
  have=$(go_version "$cand")
  if [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" = "$want" ]; then
    GO=$cand
    break
  fi
done
if [ -z "$GO" ]; then
  echo "build-noise-processor: no Go >= $want found (\`go\` on PATH: $(command -v go || echo none));" \
       "install it (https://go.dev/dl/), or with Go >= 1.21 set GOTOOLCHAIN=go$want to fetch it" >&2
  exit 1
fi
export PATH="$(dirname "$GO"):$PATH"

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
