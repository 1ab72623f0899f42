#!/usr/bin/env bash
# The one command that runs the main job: builds wsbridged and the bundled upstream
# emulator, starts the emulator on loopback, and runs the daemon with the demo config
# (gRPC on 127.0.0.1:50051 and /tmp/wsbridge/wsbridged.sock, admin on 127.0.0.1:9090).
# No internet, no credentials. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --runtime-only
cmake -S . -B build/run -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
ninja -C build/run wsbridged wsbridge-emulator

emulator_out=$(mktemp)
build/run/tests/upstreams/wsbridge-emulator --dfx 127.0.0.1:18081 >"$emulator_out" &
emulator_pid=$!
trap 'kill "$emulator_pid" 2>/dev/null || true; wait "$emulator_pid" 2>/dev/null || true; rm -f "$emulator_out"' EXIT
for _ in $(seq 1 100); do
  grep -q '"url"' "$emulator_out" && break
  kill -0 "$emulator_pid" 2>/dev/null || { echo "emulator failed to start" >&2; exit 1; }
  sleep 0.1
done
echo "emulator: $(cat "$emulator_out")" >&2
mkdir -p /tmp/wsbridge
build/run/daemon/wsbridged --config deploy/config/demo.yaml "$@"
