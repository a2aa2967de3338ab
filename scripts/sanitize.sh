#!/usr/bin/env bash
# Build a2sf with AddressSanitizer + UndefinedBehaviorSanitizer and run the
# engine tests under it.
#
#   bash scripts/sanitize.sh [pytest args]      (default: the engine tests below)
#
# The sanitized build lives apart from the normal one: build tree
# build/sanitize, virtual environment .venv-san. Python itself is not
# instrumented, so the ASan runtime is preloaded (LD_PRELOAD) and its leak
# checker is off (Python's own allocations would all be reported). Any ASan or
# UBSan report stops the run (halt_on_error) and fails this script.
# A first build recompiles all of llama.cpp with the sanitizers (10+ minutes on
# 2 cores); A2SF_SANITIZE_SKIP_BUILD=1 reuses the installed one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[sanitize] $*" >&2; }
export CCACHE_BASEDIR="$ROOT"

VENV=.venv-san
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
req_stamp="$VENV/.a2sf-requirements"
req_hash="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
    log "installing requirements.txt into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$req_hash" > "$req_stamp"
fi

if [ -z "${A2SF_SANITIZE_SKIP_BUILD:-}" ]; then
    log "building with -DA2SF_SANITIZE=ON into build/sanitize"
    t0=$SECONDS
    CMAKE_ARGS="-DA2SF_SANITIZE=ON ${CMAKE_ARGS:-}" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -q \
        ${A2SF_PIP_VERBOSE:+-v} \
        --config-settings=build-dir=build/sanitize \
        --config-settings=cmake.build-type=RelWithDebInfo .
    log "built and installed in $((SECONDS - t0)) s"
fi

libasan="$(${CC:-gcc} -print-file-name=libasan.so)"
libubsan="$(${CC:-gcc} -print-file-name=libubsan.so)"
if [ ! -e "$libasan" ]; then
    log "libasan.so not found (${CC:-gcc} -print-file-name=libasan.so)"
    exit 1
fi

if [ $# -eq 0 ]; then
    set -- tests/test_engine_core.py tests/test_engine_llama.py tests/test_engine_reference.py \
           tests/test_state.py tests/test_bad_input.py tests/test_threads.py -m "not slow" -q
fi

log_dir="build/sanitize/reports"
rm -rf "$log_dir" && mkdir -p "$log_dir"
# log_path: reports go to files as well, so one printed by a worker thread is not lost
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$ROOT/$log_dir/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$ROOT/$log_dir/ubsan:${UBSAN_OPTIONS:-}"
log "LD_PRELOAD=$libasan:$libubsan"
log "pytest $*"
set +e
LD_PRELOAD="$libasan:$libubsan" "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
n_reports=$(find "$log_dir" -type f | wc -l)
if [ "$n_reports" -gt 0 ]; then
    log "$n_reports sanitizer report file(s):"
    for f in "$log_dir"/*; do echo "=== $f"; head -60 "$f"; done
    exit 1
fi
log "pytest exit code $rc; sanitizer reports: 0"
exit $rc
