#!/usr/bin/env bash
# The native ctest suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer:
# everything — ggml included — built with clang and -fsanitize=address,undefined, then ctest, with
# the sanitizers' reports counted in its output.
#
#   npm run test:asan            (scripts/test-asan.sh; FERRY_BUILD_JOBS sets the build's -j)
#
# It shares its build directory (build-fuzz/cmake) and configuration (scripts/sanitized-build.sh)
# with scripts/fuzz.sh: one instrumented ggml serves both, which on a 2-core machine saves the longest part of either. The
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

# shellcheck source=scripts/sanitized-build.sh
source "$root/scripts/sanitized-build.sh"
sanitized_configure test:asan "$root" "$out" "$top/asan-configure.log" "$ggml"
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
