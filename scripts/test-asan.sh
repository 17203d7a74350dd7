#!/usr/bin/env bash
# The native ctest suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer:
# builds everything in build-asan/ — ggml included — with -fsanitize=address,undefined, runs ctest,
# and counts the sanitizers' reports in its output.
#
#   npm run test:asan            (scripts/test-asan.sh; FERRY_BUILD_JOBS sets the build's -j)
#
# Output: build-asan/asan-results.json {tests, failed, errors, leaks}; the exit status is 1 when a
# test fails or any report was written. Every report is fatal in its test (CMakeLists.txt sets
# halt_on_error and -fno-sanitize-recover=undefined), so `errors` counts tests stopped by one.
# Needs a compiler with the sanitizer runtimes: GCC's libasan/libubsan (Debian: g++), or clang
# with CC=clang CXX=clang++ (Debian: clang libclang-rt-14-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${FERRY_ASAN_DIR:-$root/build-asan}
ggml=${FERRY_GGML_DIR:-$root/deps/ggml}

if [ ! -f "$ggml/CMakeLists.txt" ]; then
  echo "test:asan: no ggml sources at $ggml; run npm ci first (it extracts them)" >&2
  exit 2
fi

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
mkdir -p "$out"
cmake -S "$root" -B "$out" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFERRY_SANITIZE=address,undefined -DFERRY_BUILD_TESTS=ON -DFERRY_GGML_DIR="$ggml" \
  >"$out/configure.log" 2>&1 || { cat "$out/configure.log" >&2; exit 2; }
# The tests only (the benchmark binary is not run here).
targets=$(sed -n 's/^\([a-z_]*\):.*/\1/p' <(cmake --build "$out" --target help 2>/dev/null) | grep '^test_' || true)
if [ -z "$targets" ]; then
  targets=$(cd native/tests && ls test_*.cpp | sed 's/\.cpp$//')
fi
# shellcheck disable=SC2086
cmake --build "$out" --parallel "${FERRY_BUILD_JOBS:-2}" --target $targets >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log" >&2; exit 2; }

log="$out/ctest.log"
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
  | tee "$out/asan-results.json"
if [ "$rc" != 0 ] || [ "$errors" != 0 ] || [ "$leaks" != 0 ]; then
  grep -E 'ERROR: |SUMMARY: |runtime error:' "$log" | head -20 >&2 || true
  exit 1
fi
