#!/usr/bin/env bash
# Pack what a lent GPU machine needs to build and check a2sf. That machine
# reaches no package registry and gets only the working tree (64 MiB at most),
# so everything else travels in .device/ (git-ignored; the device tool's
# `carry`):
#
#   .device/llama.cpp.tar.xz  the pinned llama.cpp tree of the llama-cpp-python
#                             sdist, without what the build never reads (models,
#                             docs, tests, examples, the backends a CUDA build
#                             leaves off); its upstream commit kept in .git/HEAD
#   .device/site/             pure-Python packages the device image lacks:
#                             llama_cpp (from the same sdist), gguf, diskcache
#   .device/texts/            Emma, for the benchmark's prompts (../shared does
#                             not travel)
#
#   bash scripts/setup.sh && bash scripts/device_pack.sh
#   then, with the device tool: run(command="bash scripts/device_check.sh", carry=[".device"])
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
log() { echo "[device_pack] $*" >&2; }

src="$("$PY" cpp/scripts/fetch_llama_cpp.py)"          # .../llama_cpp_python-<ver>/vendor/llama.cpp
commit="$("$PY" cpp/scripts/fetch_llama_cpp.py --commit | tail -1)"
sdist_root="$(cd "$src/../.." && pwd)"

rm -rf .device
mkdir -p .device/site .device/texts
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

log "llama.cpp tree from $src (commit ${commit:0:12})"
mkdir -p "$stage/llama.cpp/.git"
echo "$commit" > "$stage/llama.cpp/.git/HEAD"
# ggml's backends are added only when their GGML_<NAME> option is on, and
# LLAMA_BUILD_TESTS/EXAMPLES are off (cmake/A2SFLlamaCpp.cmake), so these are never read.
excl=(models docs tests examples benches media pocs app ci skills .github tools/ui gguf-py)
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
    excl+=("ggml/src/ggml-$b")
done
tar_excl=(--exclude=./.git)
for e in "${excl[@]}"; do tar_excl+=("--exclude=./$e"); done
tar -C "$src" "${tar_excl[@]}" -cf - . | tar -C "$stage/llama.cpp" -xf -
tar -C "$stage" -cJf .device/llama.cpp.tar.xz llama.cpp

log "Python packages"
cp -r "$sdist_root/llama_cpp" .device/site/
site="$("$PY" -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')"
cp -r "$site/gguf" "$site/diskcache" .device/site/
find .device/site -name __pycache__ -prune -exec rm -rf {} +

log "texts"
cp "$("$PY" -c 'from a2sf.eval.data import austen_dir; print(austen_dir())')/emma.txt" .device/texts/

du -sh .device/* >&2
total=$(du -sm .device | cut -f1)
log ".device: ${total} MiB (the device tool carries 64 MiB with the working tree)"
