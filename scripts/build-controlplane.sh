#!/usr/bin/env bash
# Build kube-apiserver and etcd from their official Go modules (through the Go
# module proxy) for the integration-test control plane, cached outside the
# repo. The cache key is the hash of the two pinning modules, so bumping a
# version in tests/controlplane/*/go.mod rebuilds and nothing else does.
#
# With METAL_AGENT_NO_BUILD set it only looks up the cache (exit 3 on a miss).
# Prints the directory holding `kube-apiserver` and `etcd` on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cp_dir="$here/tests/controlplane"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"

key="$(cat "$cp_dir"/apiserver/go.mod "$cp_dir"/apiserver/go.sum \
           "$cp_dir"/etcd/go.mod "$cp_dir"/etcd/go.sum | sha256sum | cut -c1-16)"
k8s_version="$(grep -oE 'k8s\.io/kubernetes v[0-9][^ ]*' "$cp_dir/apiserver/go.mod" | head -1 | cut -d' ' -f2)"
DEST="$CACHE_ROOT/controlplane-$k8s_version-$key"

if [[ -x "$DEST/kube-apiserver" && -x "$DEST/etcd" ]]; then
  echo "$DEST"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "not built yet: run $0 (or make dev)" >&2
  exit 3
fi

mkdir -p "$DEST.tmp"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly"
echo ">> building etcd" >&2
(cd "$cp_dir/etcd" && go build -trimpath -ldflags=-s -o "$DEST.tmp/etcd" go.etcd.io/etcd/server/v3)
echo ">> building kube-apiserver $k8s_version (several minutes on a cold cache)" >&2
(cd "$cp_dir/apiserver" && go build -trimpath -ldflags=-s -o "$DEST.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST"
