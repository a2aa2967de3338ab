#!/usr/bin/env bash
# The GPU checks of issues 15 and 17, on a lent device machine (CUDA, nothing
# fetched there). Pack first, here: `bash scripts/device_pack.sh`. Then, with the
# device tool, two calls back to back (a machine idle for 30 s is given back,
# and /tmp with the build goes with it):
#
#   run(command="bash scripts/device_check.sh build check", carry=[".device"], timeout_s=540)
#   run(command="bash scripts/device_check.sh bench",       carry=[".device"], timeout_s=420)
#
# Steps (arguments; default: all three):
#   build  a2sf with -DGGML_CUDA=on from .device/llama.cpp.tar.xz into /tmp/a2sf-site
#          (build dir /tmp/a2sf-build, never the checkout's build/)
#          (CUDA_ARCH, default 90: H100/H200; GGML_CUDA=off runs the same steps on a
#          CPU-only machine, to check the kit itself)
#   check  scripts/gpu_check.py: GPU vs CPU kept sets, scores and logits of every
#          policy x granularity x mode, and where each op runs   -> $OUT/gpu_check.md
#   bench  python -m a2sf.bench overhead with all layers offloaded, on a random
#          SmolLM2-shaped Q4_K_M model (the real one is not on that machine)
#                                                                -> $OUT/bench_gpu.md, .json
# Logs: $OUT/log.txt, $OUT/build.log. Exit status: the first failing step's.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/a2sf-device-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE=/tmp/a2sf-site
SRC=/tmp/a2sf-llama.cpp
BUILD_DIR=/tmp/a2sf-build
log() { echo "[device_check $(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build check bench)

[ -f .device/llama.cpp.tar.xz ] || { log "no .device/: run scripts/device_pack.sh here and carry .device"; exit 2; }
export PYTHONPATH="$SITE:$ROOT/.device/site${PYTHONPATH:+:$PYTHONPATH}"

# cuBLAS and the CUDA runtime: the toolkit's, else the nvidia-* wheels of the image's Python
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
cublas="$(ls "$cuda_home"/lib64/libcublas.so* 2>/dev/null | head -1)"
if [ -z "$cublas" ]; then
    cublas="$("$PY" - <<'EOF'
import glob, os, sys
for p in sys.path:
    hits = sorted(glob.glob(os.path.join(p, "nvidia", "**", "libcublas.so*"), recursive=True))
    if hits:
        print(hits[0]); break
EOF
)"
fi
cublas_lt="${cublas/libcublas./libcublasLt.}"
lib_dirs="$cuda_home/lib64${cublas:+:$(dirname "$cublas")}"
export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

for step in "${steps[@]}"; do
    case "$step" in
    build)
        log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
        log "nvcc: $(nvcc --version 2>&1 | tail -1); cuBLAS: ${cublas:-not found}"
        rm -rf "$SRC" && mkdir -p "$SRC" && tar -xJf .device/llama.cpp.tar.xz -C "$SRC" || exit 2
        args="-DA2SF_LLAMA_CPP_DIR=$SRC/llama.cpp -DGGML_CUDA=${GGML_CUDA:-on}"
        if [ "${GGML_CUDA:-on}" != off ]; then
            args+=" -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}"
            if [ -n "$cublas" ] && [[ "$cublas" != "$cuda_home"/* ]]; then
                inc="$(dirname "$(dirname "$cublas")")/include"
                args+=" -DCUDA_cublas_LIBRARY=$cublas -DCUDA_cublasLt_LIBRARY=$cublas_lt"
                args+=" -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
            fi
            # no driver stub to link against: without VMM ggml-cuda needs none
            ls "$cuda_home"/lib64/stubs/libcuda.so >/dev/null 2>&1 || args+=" -DGGML_CUDA_NO_VMM=ON"
        fi
        log "building: CMAKE_ARGS=$args"
        t0=$SECONDS
        # its own build dir: pyproject's build/{wheel_tag} is the checkout's CPU build, whose
        # CMake cache would keep GGML_CUDA=on for the next `bash scripts/setup.sh`
        if ! CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -q --no-build-isolation \
                --no-deps --no-index --target "$SITE" --upgrade --config-settings=build-dir="$BUILD_DIR" \
                . >"$OUT/build.log" 2>&1; then
            tail -40 "$OUT/build.log" >&2
            log "build failed after $((SECONDS - t0)) s"
            exit 3
        fi
        log "built in $((SECONDS - t0)) s: $("$PY" -c 'import a2sf, llama_cpp; print("gpu_offload", llama_cpp.llama_supports_gpu_offload())')"
        ;;
    check)
        t0=$SECONDS
        "$PY" scripts/gpu_check.py --threads 8 --out "$OUT/gpu_check.md" 2>>"$OUT/log.txt" >/dev/null
        rc=$?
        log "gpu_check rc=$rc in $((SECONDS - t0)) s"
        [ $rc -eq 0 ] || exit 4
        ;;
    bench)
        t0=$SECONDS
        model=/tmp/smollm2-shape.Q4_K_M.gguf
        [ -f "$model" ] || "$PY" scripts/gpu_check.py --shape-model "$model" --threads "$(nproc)" >/dev/null || exit 5
        "$PY" -m a2sf.bench --sections overhead --model "$model" --text .device/texts --n-gpu-layers -1 \
            --sizes 1024 4096 --flash-attn off on --reps 3 --decode 64 --threads 8 \
            --policies streaming h2o a2sf a2sf+decode_scoring=eager tova mean \
            --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.md" 2>>"$OUT/log.txt"
        rc=$?
        log "bench rc=$rc in $((SECONDS - t0)) s"
        [ $rc -eq 0 ] || exit 6
        ;;
    *)
        log "unknown step $step (build, check, bench)"
        exit 2
        ;;
    esac
done
