#!/usr/bin/env bash
# Sourced by scripts/fuzz.sh and scripts/test-asan.sh: the clang toolchain and the configuration
# of the one instrumented build they share (build-fuzz/cmake: clang, -fsanitize=address,undefined,
# libFuzzer's coverage hooks, ggml included), so the longest part of either is done once.
#
#   sanitized_configure NAME ROOT BUILD_DIR LOG GGML_DIR
#
# Clang comes from Debian (apt-get install clang libclang-rt-14-dev): installed when missing and
# running as root, else NAME says what is needed and the calling script exits 2 — as it does when
# the ggml sources are missing or the configure step fails (its log is printed).
sanitized_configure() {
  local name=$1 root=$2 build=$3 log=$4 ggml=$5
  local runtimes=/usr/lib/llvm-*/lib/clang/*/lib/linux
  if ! command -v clang++ >/dev/null 2>&1 \
    || ! ls $runtimes/libclang_rt.fuzzer-x86_64.a $runtimes/libclang_rt.asan-x86_64.a >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "$name: installing clang and its runtime libraries (libFuzzer, sanitizers)" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev >/dev/null
    else
      echo "$name: needs clang with libFuzzer and the sanitizer runtimes (Debian: apt-get install clang libclang-rt-14-dev)" >&2
      exit 2
    fi
  fi
  if [ ! -f "$ggml/CMakeLists.txt" ]; then
    echo "$name: no ggml sources at $ggml; run npm ci first (it extracts them)" >&2
    exit 2
  fi
  local generator=()
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  mkdir -p "$build"
  CC=clang CXX=clang++ cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DFERRY_FUZZ=ON -DFERRY_SANITIZE=address,undefined -DFERRY_BUILD_TESTS=ON \
    -DFERRY_GGML_DIR="$ggml" >"$log" 2>&1 || { cat "$log" >&2; exit 2; }
}
