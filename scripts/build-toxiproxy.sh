#!/usr/bin/env bash
# Build Toxiproxy's server from its official Go module (through the Go module
# proxy) for the fault tests, which put it between the agent and the real
# kube-apiserver. Pinned by tests/toxiproxy/go.mod + go.sum and cached outside
# the repo by version and the hash of those pins, so bumping the version
# rebuilds and nothing else does. A cold build takes seconds.
#
# With METAL_AGENT_NO_BUILD set it only looks up the cache (exit 3 on a miss).
# Prints the directory holding `toxiproxy-server` on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mod_dir="$here/tests/toxiproxy"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"

key="$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" | sha256sum | cut -c1-16)"
version="$(grep -oE 'github\.com/Shopify/toxiproxy/v2 v[0-9][^ ]*' "$mod_dir/go.mod" | head -1 | cut -d' ' -f2)"
DEST="$CACHE_ROOT/toxiproxy-$version-$key"

if [[ -x "$DEST/toxiproxy-server" ]]; then
  echo "$DEST"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "not built yet: run $0 (or make dev)" >&2
  exit 3
fi

mkdir -p "$DEST.tmp"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly"
echo ">> building toxiproxy-server $version" >&2
(cd "$mod_dir" && go build -trimpath \
   -ldflags="-s -X github.com/Shopify/toxiproxy/v2.Version=$version" \
   -o "$DEST.tmp/toxiproxy-server" github.com/Shopify/toxiproxy/v2/cmd/server)
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST"
