#!/usr/bin/env bash
# The one command that runs every test: installs what is missing, builds and runs the
# whole suite, runs each fuzz target briefly, then builds and runs the suite again
# under AddressSanitizer + UndefinedBehaviorSanitizer.
#   scripts/test.sh            everything (what CI runs)
#   FUZZ_SECONDS=60 scripts/test.sh   longer fuzz runs
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)
fuzz_seconds=${FUZZ_SECONDS:-20}

bash scripts/setup.sh

step() { printf '\n=== %s (%ss elapsed)\n' "$*" "$SECONDS"; }

step "release build"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DWSBRIDGE_BUILD_BENCH=ON >/dev/null
ninja -C build/release
step "release tests"
ctest --test-dir build/release --output-on-failure -j "$jobs"

step "fuzz targets (clang, ${fuzz_seconds}s each)"
# Coverage instrumentation and ASan+UBSan on everything the fuzzers link, not only
# their entry points.
CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" \
  -DWSBRIDGE_FUZZ=ON -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
ninja -C build/fuzz fuzz
for f in build/fuzz/tests/fuzz/*_fuzz; do
  [[ -x "$f" ]] || continue
  corpus="$root/tests/fuzz/corpus/$(basename "$f")"
  work=$(mktemp -d)
  [[ -d "$corpus" ]] && cp -r "$corpus"/. "$work"/
  echo "fuzz: $(basename "$f")"
  "$f" -max_total_time="$fuzz_seconds" -print_final_stats=1 "$work" 2>&1 | tail -n 3
  rm -rf "$work"
done

step "ASan+UBSan build"
# -O0: GCC with UBSan at -O1 spends minutes on each Beast-heavy file; -O0 is 4x faster to build.
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g -O0" \
  -DWSBRIDGE_SANITIZE=ON -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
ninja -C build/asan
step "ASan+UBSan tests"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/asan --output-on-failure -j "$jobs"
step "done"
