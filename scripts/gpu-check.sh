#!/usr/bin/env bash
# The native layer's check on a GPU machine: builds ggml's CUDA backend and Ferry's core for this
# machine's GPU architecture alone, runs the native ctest suite (test_gpu runs on the GPU there)
# and the native benchmark on the GPU device, and writes everything under $OUT (default
# ./gpu-check-out). Needs only the repo, CMake, a C++17 compiler, nvcc and cuBLAS — no Node.
#
# ggml's sources: FERRY_GGML_DIR, else deps/ggml (what `npm run build:native` extracts from
# node-llama-cpp's bundle; carry it to a machine without npm). cuBLAS: the CUDA toolkit's own, else
# the `nvidia-cublas` Python package's headers and libraries (found through python3).
#
# Usage: scripts/gpu-check.sh            (FERRY_BUILD_JOBS=16, FERRY_GPU_ARCH=90 to override)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
log() { echo "[gpu-check] $*" | tee -a "$OUT/gpu-check.log" >&2; }
started=$(date +%s)

GGML_DIR="${FERRY_GGML_DIR:-$PWD/deps/ggml}"
if [[ ! -f "$GGML_DIR/include/ggml.h" ]]; then
  log "no ggml sources at $GGML_DIR: run \`npm run build:native\` once on a machine with npm and carry deps/ggml, or set FERRY_GGML_DIR"
  exit 2
fi
command -v nvcc >/dev/null || { log "nvcc not found"; exit 2; }
command -v cmake >/dev/null || { log "cmake not found"; exit 2; }

# The GPU's architecture: one, so nvcc compiles ggml-cuda's kernels once.
ARCH="${FERRY_GPU_ARCH:-}"
if [[ -z "$ARCH" ]] && command -v nvidia-smi >/dev/null; then
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
fi
[[ -n "$ARCH" ]] || { log "could not tell the GPU's compute capability; set FERRY_GPU_ARCH (e.g. 90)"; exit 2; }
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
else
  echo "no nvidia-smi" > "$OUT/gpu.txt"
fi
log "GPU: $(cat "$OUT/gpu.txt"); architecture sm_$ARCH"

# cuBLAS from the Python package when the toolkit has none.
CMAKE_EXTRA=()
# The toolkit's root as nvcc itself sees it (nvcc on PATH may be a wrapper script).
CUDA_ROOT="${CUDA_HOME:-$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}"
CUDA_ROOT="$(readlink -f "${CUDA_ROOT:-/usr/local/cuda}")"
if ! ls "$CUDA_ROOT"/lib64/libcublas.so* "$CUDA_ROOT"/lib/libcublas.so* >/dev/null 2>&1; then
  CUBLAS_DIR="$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) if nvidia.cublas.__file__ else list(nvidia.cublas.__path__)[0])' 2>/dev/null || true)"
  if [[ -z "$CUBLAS_DIR" || ! -d "$CUBLAS_DIR/include" ]]; then
    log "cuBLAS not found in $CUDA_ROOT nor in python3's nvidia-cublas package"
    exit 2
  fi
  LIBS="$OUT/cublas-libs"
  mkdir -p "$LIBS"
  # The wheel ships versioned names only; CMake looks for libcublas.so.
  for lib in cublas cublasLt; do
    src="$(ls "$CUBLAS_DIR"/lib/lib$lib.so.* | head -1)"
    ln -sf "$src" "$LIBS/lib$lib.so"
  done
  log "cuBLAS from $CUBLAS_DIR"
  CMAKE_EXTRA+=(
    "-DCUDA_cublas_LIBRARY=$LIBS/libcublas.so"
    "-DCUDA_cublasLt_LIBRARY=$LIBS/libcublasLt.so"
    "-DCMAKE_CUDA_FLAGS=-I$CUBLAS_DIR/include"
    "-DCMAKE_CXX_FLAGS=-I$CUBLAS_DIR/include"
  )
  export LD_LIBRARY_PATH="$CUBLAS_DIR/lib:${LD_LIBRARY_PATH:-}"
fi

BUILD="${FERRY_GPU_BUILD:-$PWD/build-gpu}"
JOBS="${FERRY_BUILD_JOBS:-$(nproc)}"
log "configuring ($BUILD)"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DFERRY_CUDA=ON -DFERRY_BUILD_TESTS=ON \
  -DFERRY_GGML_DIR="$GGML_DIR" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" "${CMAKE_EXTRA[@]}" \
  >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; log "configure failed"; exit 1; }
log "building with $JOBS jobs"
cmake --build "$BUILD" -j "$JOBS" >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; log "build failed"; exit 1; }
log "built in $(($(date +%s) - started)) s"

status=0
log "native tests"
ctest --test-dir "$BUILD" --output-on-failure >"$OUT/ctest.log" 2>&1 || status=1
tail -5 "$OUT/ctest.log" | tee -a "$OUT/gpu-check.log" >&2

log "native benchmark on the GPU"
BENCH="$BUILD/ferry_native_bench"
"$BENCH" --device gpu --json >"$OUT/bench-gpu.json" 2>"$OUT/bench-gpu.log" || status=1
"$BENCH" --device gpu --dtype q4_K --json >"$OUT/bench-gpu-q4_K.json" 2>>"$OUT/bench-gpu.log" || status=1
"$BENCH" --device cpu --json >"$OUT/bench-cpu.json" 2>"$OUT/bench-cpu.log" || status=1
log "done in $(($(date +%s) - started)) s (status $status); results in $OUT"
exit "$status"
