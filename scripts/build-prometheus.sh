#!/usr/bin/env bash
# Build upstream Prometheus from its Go module (through the Go module proxy)
# for the tests in which the cluster's Prometheus discovers the Macs:
# Debian's `prometheus` package has Kubernetes service discovery patched out
# ("Disable kubernetes SD"), and those tests need kubernetes_sd_configs with
# role endpointslice against the test kube-apiserver. Only that discovery is
# compiled in (build tags remove_all_sd,enable_kubernetes_sd), and no web UI
# (the HTTP API is all the tests use). Pinned by tests/prometheus/go.mod +
# go.sum, cached outside the repo by version and the hash of those pins.
#
# With METAL_AGENT_NO_BUILD set it only looks up the cache (exit 3 on a miss).
# Prints the directory holding `prometheus` on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mod_dir="$here/tests/prometheus"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"

key="$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" | sha256sum | cut -c1-16)"
version="$(grep -oE 'github\.com/prometheus/prometheus v[0-9][^ ]*' "$mod_dir/go.mod" | head -1 | cut -d' ' -f2)"
DEST="$CACHE_ROOT/prometheus-$version-$key"

if [[ -x "$DEST/prometheus" ]]; then
  echo "$DEST"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "not built yet: run $0 (or make dev)" >&2
  exit 3
fi

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly"
echo ">> building prometheus $version (Kubernetes discovery only; a few minutes on 2 cores)" >&2
(cd "$mod_dir" && go build -trimpath -tags remove_all_sd,enable_kubernetes_sd \
   -ldflags="-s -X github.com/prometheus/common/version.Version=$version" \
   -o "$DEST.tmp/prometheus" github.com/prometheus/prometheus/cmd/prometheus)
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST"
