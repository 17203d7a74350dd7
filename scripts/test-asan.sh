#!/usr/bin/env bash
# The native ctest suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer:
# everything — ggml included — built with clang and -fsanitize=address,undefined, then ctest, with
# the sanitizers' reports counted in its output.
#
#   npm run test:asan            (scripts/test-asan.sh; FERRY_BUILD_JOBS sets the build's -j)
#
# It shares its build directory (build-fuzz/cmake) and configuration with scripts/fuzz.sh: one
# instrumented ggml serves both, which on a 2-core machine saves the longest part of either. The
# objects therefore also carry libFuzzer's coverage hooks (-fsanitize=fuzzer-no-link); in a test
# binary they only count edges. Clang comes from Debian (apt-get install clang libclang-rt-14-dev),
# installed here when missing and running as root.
#
# Output: build-fuzz/asan-results.json {tests, failed, errors, leaks}; the exit status is 1 when a
# test fails or any report was written. Every report is fatal in its test (CMakeLists.txt sets
# halt_on_error and -fno-sanitize-recover=undefined), so `errors` counts tests stopped by one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
top=${FERRY_FUZZ_DIR:-$root/build-fuzz}
out=$top/cmake
ggml=${FERRY_GGML_DIR:-$root/deps/ggml}

if ! command -v clang++ >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.asan-x86_64.a >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test:asan: installing clang and its runtime libraries (sanitizers, libFuzzer)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev >/dev/null
  else
    echo "test:asan: needs clang with its sanitizer runtimes (Debian: apt-get install clang libclang-rt-14-dev)" >&2
    exit 2
  fi
fi

if [ ! -f "$ggml/CMakeLists.txt" ]; then
  echo "test:asan: no ggml sources at $ggml; run npm ci first (it extracts them)" >&2
  exit 2
fi

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
mkdir -p "$out"
# The same configuration as scripts/fuzz.sh (see above).
CC=clang CXX=clang++ cmake -S "$root" -B "$out" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFERRY_FUZZ=ON -DFERRY_SANITIZE=address,undefined -DFERRY_BUILD_TESTS=ON \
  -DFERRY_GGML_DIR="$ggml" >"$top/asan-configure.log" 2>&1 || { cat "$top/asan-configure.log" >&2; exit 2; }
# The tests only (the benchmark binary is not run here).
targets=$(sed -n 's/^\([a-z_]*\):.*/\1/p' <(cmake --build "$out" --target help 2>/dev/null) | grep '^test_' || true)
if [ -z "$targets" ]; then
  targets=$(cd native/tests && ls test_*.cpp | sed 's/\.cpp$//')
fi
# shellcheck disable=SC2086
cmake --build "$out" --parallel "${FERRY_BUILD_JOBS:-2}" --target $targets >"$top/asan-build.log" 2>&1 \
  || { tail -50 "$top/asan-build.log" >&2; exit 2; }

log="$top/asan-ctest.log"
rc=0
ctest --test-dir "$out" --output-on-failure --timeout 1800 >"$log" 2>&1 || rc=$?
# ctest prints a failing test's output only; a passing test cannot have a report (every one is
# fatal), so counting the log counts them all.
tests=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#' "$log" || true)
failed=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#.*(Failed|Exception|Timeout|\*\*\*)' "$log" || true)
errors=$(grep -cE 'ERROR: AddressSanitizer|runtime error:' "$log" || true)
leaks=$(grep -cE 'ERROR: LeakSanitizer' "$log" || true)
tail -n 15 "$log"
echo "{\"sanitizers\":\"address,undefined\",\"tests\":$tests,\"failed\":$failed,\"errors\":$errors,\"leaks\":$leaks}" \
  | tee "$top/asan-results.json"
if [ "$rc" != 0 ] || [ "$errors" != 0 ] || [ "$leaks" != 0 ]; then
  grep -E 'ERROR: |SUMMARY: |runtime error:' "$log" | head -20 >&2 || true
  exit 1
fi
