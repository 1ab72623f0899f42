#!/usr/bin/env bash
# The soak for as long as you like: random upstream faults (resets, FINs, held outages,
# sliced and delayed traffic) on every bridge while callers work, then the invariants and
# the memory check (tests/faults/soak_test.cc). The test command runs it for 20 s per
# bridge; this runs it longer.
#   scripts/soak.sh                         600 s per bridge, every bridge
#   SOAK_SECONDS=3600 scripts/soak.sh dfx nlx
#   WSBRIDGE_SOAK_SEED=123 scripts/soak.sh nexora    replay a run's faults (it prints its seed)
# Prints, per bridge, the fault cycles, upstream connections, calls and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SOAK_SECONDS:-600}

bash scripts/setup.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DWSBRIDGE_BUILD_BENCH=ON >/dev/null
ninja -C build/release tests/faults/fault_scenarios_test

bridges=("$@")
[[ ${#bridges[@]} -eq 0 ]] && bridges=(dfx nlx emogg nexora)
status=0
for b in "${bridges[@]}"; do
  WSBRIDGE_SOAK_SECONDS=$seconds build/release/tests/faults/fault_scenarios_test \
    --gtest_filter="Soak/SoakTest.*/$b" 2>&1 | grep -E '^\[soak|Failure|FAILED|^  |^\[  PASSED' || true
  # The exit status of the test binary, not grep's.
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
exit $status
