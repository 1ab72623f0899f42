#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan+UBSan, build/fuzz) and runs each for a while.
#   scripts/fuzz.sh                          every harness, FUZZ_SECONDS (default 600) each
#   FUZZ_SECONDS=60 scripts/fuzz.sh ws_client_fuzz config_fuzz
#   FUZZ_BUILD_DIR=build/asan-clang scripts/fuzz.sh   the harnesses of a tree configured
#                                            with WSBRIDGE_FUZZ=ON (scripts/test.sh's)
# Each run starts from the harness's seed corpus (tests/fuzz/corpus/<harness>/) plus what
# earlier runs found (<build>/found/<harness>/, kept between runs, never committed),
# with the harness's dictionary when it has one. A failure stops the script: the input is
# in <build>/artifacts/; copy it into tests/fuzz/corpus/<harness>/ once fixed, and it
# replays as a test from then on (ctest -R fuzz_replay).
# Prints, per harness, the executions and the corpus size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${FUZZ_SECONDS:-600}
build=${FUZZ_BUILD_DIR:-build/fuzz}

if [[ -z ${FUZZ_BUILD_DIR:-} ]]; then
  # Coverage instrumentation and ASan+UBSan on everything the fuzzers link, not only
  # their entry points.
  CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" \
    -DWSBRIDGE_FUZZ=ON -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
fi
ninja -C "$build" fuzz

harnesses=("$@")
if [[ ${#harnesses[@]} -eq 0 ]]; then
  for f in "$build"/tests/fuzz/*_fuzz; do
    [[ -x "$f" ]] && harnesses+=("$(basename "$f")")
  done
fi

mkdir -p "$build/artifacts"
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for h in "${harnesses[@]}"; do
  bin="$build/tests/fuzz/$h"
  [[ -x "$bin" ]] || { echo "no such harness: $h" >&2; exit 2; }
  found="$build/found/$h"
  mkdir -p "$found"
  args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
        -max_len=16384 -artifact_prefix="$build/artifacts/$h-")
  [[ -f "tests/fuzz/$h.dict" ]] && args+=(-dict="tests/fuzz/$h.dict")
  log="$build/$h.log"
  # New inputs go to the first directory ($found); the seeds are read only.
  if ! "$bin" "${args[@]}" "$found" "$root/tests/fuzz/corpus/$h" >"$log" 2>&1; then
    grep -v '^#' "$log" | tail -n 60 >&2
    echo "fuzz: $h FAILED; input in $build/artifacts/ (log: $log)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  corpus=$(( $(ls "$found" | wc -l) + $(ls "tests/fuzz/corpus/$h" | wc -l) ))
  printf 'fuzz: %-20s %10s executions in %ss, corpus %s inputs\n' "$h" "$execs" "$seconds" "$corpus"
done
