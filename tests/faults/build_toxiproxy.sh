#!/usr/bin/env bash
# Build toxiproxy-server (the fault-injecting TCP proxy of the fault matrix)
# from its Go module, once, into $KUBETASKS_CACHE/bin/toxiproxy-<version>/.
# Same scheme as e2e/cluster/build.sh: a wrapper module, GOMODCACHE and
# GOCACHE in the cache dir, never in the repository. Idempotent.
set -euo pipefail
KUBETASKS_CACHE="${KUBETASKS_CACHE:-$HOME/.cache/kubetasks}"
TOXIPROXY_VERSION="${TOXIPROXY_VERSION:-v2.12.0}"
OUT="$KUBETASKS_CACHE/bin/toxiproxy-$TOXIPROXY_VERSION/toxiproxy-server"
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { echo "build_toxiproxy.sh: go is not installed" >&2; exit 1; }
export GOMODCACHE="$KUBETASKS_CACHE/gomod"
export GOCACHE="$KUBETASKS_CACHE/gobuild"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
dir="$KUBETASKS_CACHE/src/toxiproxy-$TOXIPROXY_VERSION"
mkdir -p "$dir" "$GOMODCACHE" "$GOCACHE" "$(dirname "$OUT")"
cat > "$dir/go.mod" <<GOMOD
module kubetasks.local/toxiproxybuild

go 1.24

require github.com/Shopify/toxiproxy/v2 $TOXIPROXY_VERSION
GOMOD
echo 'package toxiproxybuild' > "$dir/doc.go"
t0=$SECONDS
(cd "$dir" && go build -p 2 -trimpath \
  -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=$TOXIPROXY_VERSION" \
  -o "$OUT.tmp" github.com/Shopify/toxiproxy/v2/cmd/server) >&2
mv "$OUT.tmp" "$OUT"
echo "build_toxiproxy.sh: built toxiproxy-server $TOXIPROXY_VERSION in $(( SECONDS - t0 ))s" >&2
echo "$OUT"
