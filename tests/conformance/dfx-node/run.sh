#!/usr/bin/env bash
# Installs the pinned vendor client with `npm ci` (from package-lock.json) into WORK_DIR,
# outside the source tree, then runs conformance.mjs against the emulator. Any failure,
# including a failed install, fails the test: it is never skipped.
#   run.sh SOURCE_DIR WORK_DIR EMULATOR [NODE] [NPM]
set -euo pipefail
src=$1 work=$2 emulator=$3 node=${4:-node} npm=${5:-npm}
command -v "$node" >/dev/null || { echo "FAIL - node not found ($node); install nodejs >= 20" >&2; exit 1; }
command -v "$npm" >/dev/null || { echo "FAIL - npm not found ($npm); install npm" >&2; exit 1; }
[[ -x "$emulator" ]] || { echo "FAIL - emulator not built: $emulator" >&2; exit 1; }
mkdir -p "$work"
cp "$src/package.json" "$src/package-lock.json" "$src/conformance.mjs" "$work/"
cd "$work"
if ! "$npm" ci --ignore-scripts --no-audit --no-fund --loglevel=error; then
  echo "FAIL - npm ci of the pinned @nuralogix.ai/dfx-api-client failed (is the npm registry reachable?)" >&2
  exit 1
fi
exec "$node" --experimental-websocket conformance.mjs "$emulator"
