#!/usr/bin/env bash
# The one command that measures wsbridge: builds Release (wsbridged, wsbridge-bench and
# the allocation counter) and runs the benchmark on loopback. Prints the table and
# writes bench-results.json (override with --json FILE). Extra arguments go to
# wsbridge-bench, e.g.:
#   scripts/bench.sh                 full run (several minutes)
#   scripts/bench.sh --quick         smoke run (seconds; figures mean nothing)
#   scripts/bench.sh --sections rt   round trips only
# See docs/performance.md for what each figure is made of.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --runtime-only
build=${BENCH_BUILD_DIR:-build/bench}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=ON >/dev/null
ninja -C "$build" wsbridged wsbridge-bench wsbridge_alloc_count

# 10,000 idle sessions need that many descriptors in wsbridged and in the bench
# upstream; both inherit this shell's limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$build/bench/wsbridge-bench" --json bench-results.json "$@"
