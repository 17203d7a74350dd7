#!/usr/bin/env bash
# libFuzzer on the model readers: builds native/fuzz/ (fuzz_safetensors, fuzz_gguf) with clang,
# ASan and UBSan — ggml included, so ggml's GGUF reader is instrumented too — writes the seed
# corpora (valid files of every dtype from the test writers, plus the shared fixtures when they
# exist), runs each target for a fixed time and prints what it tried. Its build (build-fuzz/cmake)
# is shared with scripts/test-asan.sh (both configure it with scripts/sanitized-build.sh).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60; FERRY_FUZZ_SECONDS also sets it)
#
# Output: build-fuzz/fuzz-results.json {targets: [{name, seconds, runs, crashes, corpus, …}]}.
# A crash (or sanitizer report, leak, timeout, out-of-memory) stops that target, leaves its input
# in build-fuzz/artifacts/, and makes the script exit 1. Clang comes from Debian
# (apt-get install clang libclang-rt-14-dev): installed here when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${1:-${FERRY_FUZZ_SECONDS:-60}}
out=${FERRY_FUZZ_DIR:-$root/build-fuzz}
ggml=${FERRY_GGML_DIR:-$root/deps/ggml}

# shellcheck source=scripts/sanitized-build.sh
source "$root/scripts/sanitized-build.sh"
sanitized_configure fuzz "$root" "$out/cmake" "$out/configure.log" "$ggml"
cmake --build "$out/cmake" --parallel "${FERRY_BUILD_JOBS:-2}" --target fuzz_safetensors fuzz_gguf fuzz_seeds >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log" >&2; exit 2; }

seeds_st="$out/seeds/safetensors"
seeds_gg="$out/seeds/gguf"
rm -rf "$out/seeds"
mkdir -p "$seeds_st" "$seeds_gg" "$out/artifacts"
ASAN_OPTIONS=detect_leaks=0 "$out/cmake/fuzz_seeds" "$seeds_st" "$seeds_gg"
fixtures=${FERRY_FIXTURES_DIR:-$root/../shared/fixtures}
if [ -d "$fixtures" ]; then
  # Real files written by others: small ones only (the fuzzer's inputs are capped at max_len).
  find "$fixtures" -name '*.gguf' -size -2M -exec cp {} "$seeds_gg/" \; 2>/dev/null || true
  find "$fixtures" -name '*.safetensors' -size -2M -exec cp {} "$seeds_st/" \; 2>/dev/null || true
fi

status=0
results=()
for target in fuzz_safetensors fuzz_gguf; do
  case $target in
    fuzz_safetensors) seeds=$seeds_st ;;
    fuzz_gguf) seeds=$seeds_gg ;;
  esac
  corpus="$out/corpus/$target"
  mkdir -p "$corpus"
  log="$out/$target.log"
  # The largest seed bounds the inputs' length (with some room to grow).
  max_len=$(find "$seeds" -type f -printf '%s\n' | sort -n | tail -1)
  max_len=$((max_len + 4096))
  echo "fuzz: $target for ${seconds} s ($(ls "$seeds" | wc -l) seeds, inputs up to $max_len bytes)" >&2
  rc=0
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$out/cmake/$target" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 -max_len="$max_len" \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/$target-" "$corpus" "$seeds" >"$log" 2>&1 || rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  crashes=$(find "$out/artifacts" -name "$target-*" -type f | wc -l)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
    status=1
    echo "fuzz: $target FAILED (exit $rc); its log: $log" >&2
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | head -20 >&2 || true
  fi
  echo "fuzz: $target: ${runs:-0} inputs, ${crashes} crashes, ${files} corpus files, coverage ${cov:-?} edges" >&2
  results+=("{\"name\":\"$target\",\"seconds\":$seconds,\"runs\":${runs:-0},\"crashes\":$crashes,\"exit\":$rc,\"corpus\":$files,\"coverage_edges\":${cov:-0}}")
done
joined=$(IFS=,; echo "${results[*]}")
echo "{\"sanitizers\":\"address,undefined\",\"targets\":[$joined]}" >"$out/fuzz-results.json"
cat "$out/fuzz-results.json"
exit $status
