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
# shellcheck source=lib/go-tool.sh
source "$here/scripts/lib/go-tool.sh"

go_tool_cached prometheus github.com/prometheus/prometheus "$mod_dir" prometheus
echo ">> building prometheus $VERSION (Kubernetes discovery only; a few minutes on 2 cores)" >&2
go_tool_build "$mod_dir" prometheus github.com/prometheus/prometheus/cmd/prometheus \
  -tags remove_all_sd,enable_kubernetes_sd -ldflags="-s -X github.com/prometheus/common/version.Version=$VERSION"
