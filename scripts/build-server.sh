#!/usr/bin/env bash
# Build llama.cpp's llama-server from a2sf's patched tree, with the --kv-* flags
# (cpp/server/, patch 0010) and linked to our libllama, in build/server.
#
#   bash scripts/build-server.sh                      # prints the binary's path last
#   CMAKE_ARGS="-DGGML_RPC=ON" bash scripts/build-server.sh   # + ggml-rpc-server (docs/DEPLOY.md)
#
# Environment: CMAKE_ARGS (extra CMake options, kept in build/server's cache),
# A2SF_SERVER_BUILD_DIR (default build/server), JOBS (default: nproc),
# PYTHON (default .venv/bin/python, else python3: CMake needs it for the patch step).
# Only the llama-server target (and ggml-rpc-server with GGML_RPC) is built, not
# a2sf._core or llama.cpp's other tools. ccache is shared with the wheel build
# (scripts/setup.sh): CCACHE_BASEDIR is the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[build-server] $*" >&2; }

export CCACHE_BASEDIR="$ROOT"
BUILD="${A2SF_SERVER_BUILD_DIR:-build/server}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
gen=()
if [ ! -f "$BUILD/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
    gen=(-G Ninja)
fi

log "configuring $BUILD"
# shellcheck disable=SC2086
cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DA2SF_BUILD_SERVER=ON \
    -DPython_EXECUTABLE="$PY" ${CMAKE_ARGS:-} >&2

targets=(llama-server)
if grep -q '^GGML_RPC:BOOL=ON' "$BUILD/CMakeCache.txt"; then
    targets+=(ggml-rpc-server)
fi
log "building ${targets[*]}"
t0=$SECONDS
cmake --build "$BUILD" --target "${targets[@]}" -j "${JOBS:-$(nproc)}" >&2
log "built in $((SECONDS - t0)) s"
for t in "${targets[@]:1}"; do
    log "$t: $(cd "$BUILD/bin" && pwd)/$t"
done
echo "$(cd "$BUILD/bin" && pwd)/llama-server"
