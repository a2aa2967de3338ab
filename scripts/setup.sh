#!/usr/bin/env bash
# Idempotent set-up: .venv, Python requirements, build + install a2sf (patched
# llama.cpp + our C++ + a2sf._core), and the SmolLM2 test model.
#
#   bash scripts/setup.sh
#
# Environment: PYTHON (interpreter for the venv, default python3),
# CMAKE_ARGS (passed to CMake, e.g. "-DGGML_CUDA=on" or "-DGGML_NATIVE=OFF"),
# A2SF_SKIP_MODEL=1 (do not fetch SmolLM2).
# The build tree build/<wheel tag>/ persists, so a re-run recompiles only what
# changed (a Python-only change compiles nothing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[setup] $*" >&2; }

# ccache (optional): install it when we can, continue without it otherwise.
if ! command -v ccache >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ccache"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache >/dev/null) \
            || log "could not install ccache; building without it"
    else
        log "ccache not found; building without it"
    fi
fi
# Paths below the repository root are hashed relative to it: other clones hit the cache.
export CCACHE_BASEDIR="$ROOT"

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

req_stamp=.venv/.a2sf-requirements
req_hash="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
    log "installing requirements.txt"
    python -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$req_hash" > "$req_stamp"
fi

log "building and installing a2sf (build dir: build/)"
t0=$SECONDS
python -m pip install --disable-pip-version-check --no-build-isolation --no-deps -q ${A2SF_PIP_VERBOSE:+-v} .
log "a2sf installed in $((SECONDS - t0)) s"

if [ -z "${A2SF_SKIP_MODEL:-}" ]; then
    log "SmolLM2: $(python models/get_smollm2.py)"
fi
