#!/usr/bin/env bash
# Build llama.cpp's RPC backend from a2sf's patched tree (docs/DEPLOY.md): the
# rpc-server (ggml-rpc-server) that each remote host runs, and llama-server with
# --rpc, both in build/server (scripts/build-server.sh with -DGGML_RPC=ON).
#
#   bash scripts/build-rpc.sh            # prints ggml-rpc-server's absolute path last
#   bash scripts/build-rpc.sh --python   # also a2sf in .venv with the RPC backend,
#                                        # for Llama(..., rpc_servers="host:port")
#
# Build trees and ccache are reused: build/server keeps its cache (-DGGML_RPC=ON
# stays on there); --python re-runs scripts/setup.sh with CMAKE_ARGS=-DGGML_RPC=ON,
# which recompiles only ggml's backend registry and adds libggml-rpc (the option
# then stays in build/<wheel tag>'s cache; CMAKE_ARGS="-DGGML_RPC=OFF" bash
# scripts/setup.sh turns it off again). Builds without this script have no RPC.
# Environment: as scripts/build-server.sh (CMAKE_ARGS, JOBS, A2SF_SERVER_BUILD_DIR, PYTHON).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[build-rpc] $*" >&2; }

python=0
for a in "$@"; do
    case "$a" in
        --python) python=1 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: build-rpc.sh: unknown argument '$a' (expected --python)" >&2; exit 2 ;;
    esac
done

export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_RPC=ON"
server="$(bash scripts/build-server.sh | tail -n 1)"
rpc="$(dirname "$server")/ggml-rpc-server"
[ -x "$rpc" ] || { echo "error: build-rpc.sh: $rpc was not built" >&2; exit 1; }
log "llama-server (with --rpc): $server"
if [ "$python" = 1 ]; then
    log "a2sf with the RPC backend (scripts/setup.sh)"
    A2SF_SKIP_MODEL="${A2SF_SKIP_MODEL:-1}" bash scripts/setup.sh >&2
    "${PYTHON:-.venv/bin/python}" -c "import a2sf, llama_cpp; assert llama_cpp.llama_supports_rpc(), 'a2sf has no RPC backend'" >&2
    log "a2sf: Llama(..., rpc_servers=\"host:port\") available"
fi
echo "$rpc"
