#!/usr/bin/env bash
# Build LLMKube's real controller manager (cmd/main.go) from the vendored
# source tarball in ../shared/vendor, for the coexistence tests. Its Go
# modules come from the Go module proxy, pinned by the tarball's go.sum. The
# binary and LLMKube's own CRDs, RBAC and samples are cached outside the repo,
# keyed by the tarball's hash, so only a new tarball rebuilds.
#
# Exit 4 when the tarball is absent (a user's clone has no ../shared): the
# tests that need LLMKube then skip. With METAL_AGENT_NO_BUILD set it only
# looks up the cache (exit 3 on a miss). Prints the directory holding
# `manager` and LLMKube's `config/` tree on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"
tarball="${LLMKUBE_TARBALL:-$(ls "$here"/../shared/vendor/llmkube-*.tar.gz 2>/dev/null | head -1 || true)}"

if [[ -z "$tarball" || ! -f "$tarball" ]]; then
  echo "no LLMKube source tarball (../shared/vendor/llmkube-*.tar.gz): skipping" >&2
  exit 4
fi

commit="$(basename "$tarball" .tar.gz)"; commit="${commit#llmkube-}"
key="$(sha256sum "$tarball" | cut -c1-16)"
DEST="$CACHE_ROOT/llmkube-$commit-$key"

if [[ -x "$DEST/manager" && -d "$DEST/config/crd/bases" ]]; then
  echo "$DEST"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "LLMKube manager not built yet: run $0 (or make dev)" >&2
  exit 3
fi

src="$DEST.src"
rm -rf "$src" "$DEST.tmp"
mkdir -p "$src" "$DEST.tmp"
tar -xzf "$tarball" -C "$src"
echo ">> building LLMKube manager $commit (a few minutes on a cold cache)" >&2
(cd "$src" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" \
   go build -trimpath -ldflags=-s -o "$DEST.tmp/manager" ./cmd/main.go)
cp -r "$src/config" "$DEST.tmp/config"
[[ -d "$src/deployment" ]] && cp -r "$src/deployment" "$DEST.tmp/deployment"
cp "$src/LICENSE" "$DEST.tmp/LICENSE"
rm -rf "$src" "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST"
