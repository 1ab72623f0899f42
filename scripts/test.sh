#!/usr/bin/env bash
# The one command that runs every test: installs what is missing, builds and runs the
# whole suite (which replays every fuzz corpus file and soaks every bridge for 20 s),
# builds and runs the suite again under AddressSanitizer + UndefinedBehaviorSanitizer
# (clang, soak 5 s per bridge), runs each fuzz harness of that build briefly, then the
# concurrency tests under ThreadSanitizer.
#   scripts/test.sh                    everything (what CI runs)
#   FUZZ_SECONDS=600 scripts/test.sh   longer fuzz runs (or scripts/fuzz.sh alone)
#   SOAK_SECONDS=600 scripts/soak.sh   a longer soak
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)
fuzz_seconds=${FUZZ_SECONDS:-10}

bash scripts/setup.sh

step() { printf '\n=== %s (%ss elapsed)\n' "$*" "$SECONDS"; }

# ctest, and when something failed, the failing cases and their first assertion lines
# again at the very end: one test's output (a whole binary's, in the sanitizer steps) can
# be long, and a CI log is often kept only from its tail.
run_ctest() {
  local log rc=0
  log=$(mktemp)
  ctest --output-on-failure --output-log "$log" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- what failed (repeated from above):"
    grep -E '^\[  FAILED  \]|: Failure$|ERROR: [A-Za-z]+Sanitizer|runtime error:|WARNING: ThreadSanitizer' "$log" |
      awk '!seen[$0]++' | head -60 || true
    sed -n '/tests FAILED:/,$p' "$log" | head -20
  fi
  rm -f "$log"
  return "$rc"
}

step "release build"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DWSBRIDGE_BUILD_BENCH=ON >/dev/null
ninja -C build/release
step "release tests"
run_ctest --test-dir build/release -j "$jobs"

step "ASan+UBSan build (clang; the fuzz harnesses too)"
# clang: it compiles this code base twice as fast as GCC under ASan at -O0 (connection.cc
# 21 s against 45 s), and the libFuzzer harnesses build in the same tree.
# -O0 for the tests; the fuzzers and the code they fuzz get -O1 (tests/fuzz/CMakeLists.txt).
# -g1: line tables only, enough for the sanitizers' stack traces; a fifth smaller objects
# and faster to compile and link than full debug information.
# One ctest test per gtest binary here (WSBRIDGE_TEST_PER_BINARY): a process start under
# ASan costs about 0.3 s of CPU, which one test per case paid ~720 times (~100 s of this
# step on two cores). The release step keeps one ctest test per case.
CC=clang CXX=clang++ cmake -S . -B build/asan-clang -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-g1 -O0" -DWSBRIDGE_SANITIZE=ON -DWSBRIDGE_FUZZ=ON \
  -DWSBRIDGE_BUILD_BENCH=OFF -DWSBRIDGE_TEST_PER_BINARY=ON >/dev/null
ninja -C build/asan-clang
step "ASan+UBSan tests"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The soak runs shorter here: thousands of reconnects are not needed to find a bad access.
# The checks of deployment files, docs, examples and scripts (Python and Node driving the
# binaries) ran in the release step; under the sanitizers they would only run the same
# C++ paths the C++ tests cover, at ASan's start-up cost (~2 minutes of the step). The
# Node and Python clients that make calls (dfx_node_conformance, daemon_python_client_test)
# still run here.
WSBRIDGE_SOAK_SECONDS=5 run_ctest --test-dir build/asan-clang -j "$jobs" \
  -E '^(deploy_|docs_|examples_|run_script_test|run_production_config_check_test)'

step "fuzz harnesses (${fuzz_seconds}s each)"
(unset ASAN_OPTIONS UBSAN_OPTIONS; FUZZ_BUILD_DIR=build/asan-clang FUZZ_SECONDS=$fuzz_seconds bash scripts/fuzz.sh)

step "TSan build (the concurrency tests)"
# clang -O1: GCC's TSan build of the Beast/gRPC-heavy files is far slower. Only the test
# binaries below are built. tests/tsan/README.md: what Debian's uninstrumented
# gRPC/Abseil/OpenSSL mean here, and the suppressions' rules.
CC=clang CXX=clang++ cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DWSBRIDGE_TSAN=ON -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
# Add a binary here once it runs clean under TSan (tests/tsan/README.md).
tsan_bins=(tests/core/connection_test tests/core/upstream_session_test tests/core/session_pool_test
           tests/core/bridge_base_test
           tests/core/grpc_calls_test tests/daemon/daemon_test tests/faults/fault_proxy_test
           tests/dfx/dfx_service_test tests/nlx/nlx_service_test tests/nexora/nexora_service_test)
ninja -C build/tsan "${tsan_bins[@]}"
step "TSan tests"
# Only these binaries' tests (the other test binaries are not built here): their suites.
suites=$(for b in "${tsan_bins[@]}"; do build/tsan/$b --gtest_list_tests | sed -n 's/^\([A-Za-z0-9_/]*\)\.$/\1/p'; done |
         sort -u | paste -sd'|')
export TSAN_OPTIONS="suppressions=$root/tests/tsan/suppressions.txt halt_on_error=1 second_deadlock_stack=1"
run_ctest --test-dir build/tsan -j "$jobs" -R "^($suites)\."
step "done"
