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
# shellcheck source=lib/go-tool.sh
source "$here/scripts/lib/go-tool.sh"

go_tool_cached toxiproxy github.com/Shopify/toxiproxy/v2 "$mod_dir" toxiproxy-server
echo ">> building toxiproxy-server $VERSION" >&2
go_tool_build "$mod_dir" toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server \
  -ldflags="-s -X github.com/Shopify/toxiproxy/v2.Version=$VERSION"
