#!/usr/bin/env bash
# Builds Ferry's former hand-written linear kernel (native/src/kernels/ at commit 773965f, removed
# when the executor moved onto ggml) with a small harness, and prints its GFLOP/s on a
# 64×1024×1024 product per weight type, to compare with `build/ferry_native_bench --matmul`.
# Usage: bench/old-kernels/run.sh [threads]   (needs the git history and a C++17 compiler)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(git -C "$here" rev-parse --show-toplevel)"
commit=773965f
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/inc/ferry" "$work/src"
for header in dtype errors kernels kernels_detail thread_pool; do
  git -C "$root" show "$commit:native/include/ferry/$header.h" >"$work/inc/ferry/$header.h"
done
for source in dtype.cpp linear.cpp thread_pool.cpp gemm.h kernel_util.h simd.h; do
  git -C "$root" show "$commit:native/src/kernels/$source" >"$work/src/$source"
done
git -C "$root" show "$commit:native/src/runtime/errors.cpp" >"$work/src/errors.cpp"
sources=("$work/src/dtype.cpp" "$work/src/linear.cpp" "$work/src/thread_pool.cpp" "$work/src/errors.cpp")
"${CXX:-c++}" -std=c++17 -O3 -march=native -pthread -I"$work/inc" -I"$work/src" \
  "$here/old_linear_bench.cpp" "${sources[@]}" -o "$work/old_linear_bench"
"$work/old_linear_bench" "${1:-2}"
