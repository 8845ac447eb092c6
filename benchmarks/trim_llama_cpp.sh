#!/usr/bin/env bash
# Makes .lcpp/llama-cpp-src.tar.xz for gpu_check.sh: the parts of llama.cpp's sources that its CUDA
# build of llama-bench and llama-batched-bench needs (CMake files, ggml with its CPU and CUDA backends,
# src, include, common, vendor, the two tools), about 2.3 MB, from the llama.cpp inside the
# llama-cpp-python sdist (../shared/peers/build-llama-cpp.sh unpacks it into the user cache), so the
# GPU machine, which can download nothing, builds the same version the CPU comparisons use.
#     bash benchmarks/trim_llama_cpp.sh [path/to/llama.cpp]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-$HOME/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp}
[ -f "$SRC/ggml/src/ggml-cuda/CMakeLists.txt" ] || { echo "no llama.cpp sources at $SRC"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
T=$TMP/llama.cpp
mkdir -p "$T/ggml/src" "$T/tools"
(cd "$SRC" && cp -r CMakeLists.txt cmake common include src vendor LICENSE "$T/"
 cp -r ggml/CMakeLists.txt ggml/cmake ggml/include "$T/ggml/"
 cp ggml/src/*.* ggml/src/CMakeLists.txt "$T/ggml/src/" 2>/dev/null
 cp -r ggml/src/ggml-cpu ggml/src/ggml-cuda "$T/ggml/src/"
 cp -r tools/llama-bench tools/batched-bench "$T/tools/")
printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(batched-bench)\nadd_subdirectory(llama-bench)\n' \
    >"$T/tools/CMakeLists.txt"
mkdir -p .lcpp
grep -qx '/.lcpp/' .git/info/exclude 2>/dev/null || echo /.lcpp/ >>.git/info/exclude
tar -cJf .lcpp/llama-cpp-src.tar.xz.part -C "$TMP" llama.cpp && mv .lcpp/llama-cpp-src.tar.xz.part .lcpp/llama-cpp-src.tar.xz
ls -l .lcpp/llama-cpp-src.tar.xz
