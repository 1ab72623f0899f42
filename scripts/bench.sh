#!/usr/bin/env bash
# The one command that measures wsbridge: builds Release (wsbridged, wsbridge-bench and
# the allocation counter) and runs the benchmark on loopback. Says which section is
# running ("section i of n" and what it measures); prints the table at the end and
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
if [[ ! -x $build/bench/wsbridge-bench ]]; then
  echo "bench: building wsbridged, wsbridge-bench and the emulator (Release) in $build;" \
       "the first build takes several minutes" >&2
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=ON >/dev/null
ninja -C "$build" wsbridged wsbridge-bench wsbridge_alloc_count

# What each section measures, keyed by the name wsbridge-bench prints when it starts
# one (bench/main.cc); the order is the order it runs them in.
order=(rt throughput fanout dfx emogg nlx nexora sessions alloc)
tls_only=" throughput fanout dfx emogg nlx nexora "
declare -A started_as=(
  ["  round trips"]=rt ["  throughput"]=throughput ["  fan-out"]=fanout ["  DFX pipeline"]=dfx ["  Emogg"]=emogg
  ["  NLX"]=nlx ["  Nexora"]=nexora ["  sessions"]=sessions ["  allocations"]=alloc)
declare -A measures=(
  [rt]="round trips: a 64 B call through wsbridged vs a direct WebSocket round trip plus a direct gRPC one (latency percentiles, CPU)"
  [throughput]="throughput: bridged Calls at 1/32/256 in flight vs the direct gRPC server and WebSocket client at the same load (calls/s, latency, CPU per call), and at fixed offered rates"
  [fanout]="fan-out: one upstream subscription's events delivered to many gRPC subscribers (deliveries/s, p99 delivery)"
  [dfx]="DFX pipeline: StreamMeasurement chunks through wsbridged, pacing off (chunks/s)"
  [emogg]="Emogg: Request round trip vs direct WebSocket + gRPC, Subscribe fan-out to 1/10/100 callers"
  [nlx]="NLX: a conversation turn (Send, Converse) vs a direct WebSocket turn, memory per open conversation"
  [nexora]="Nexora: time to first chunk and chunk throughput of a long answer vs a direct WebSocket client"
  [sessions]="idle upstream sessions: wsbridged memory (RSS) per idle session"
  [alloc]="allocations: heap allocations and bytes per message inside wsbridged"
)

# The plan, from the arguments wsbridge-bench will see.
chosen=" ${order[*]} "
plain=1
direct_only=0
alloc=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --sections) chosen=" ${args[i + 1]:-} "; chosen=${chosen//,/ } ;;
    --no-plain) plain=0 ;;
    --direct-only) direct_only=1 ;;
    --alloc-lib) [[ -n ${args[i + 1]:-} ]] || alloc=0 ;;
  esac
done
plan=()
for run in tls plain; do
  [[ $run == plain && $plain == 0 ]] && continue
  for s in "${order[@]}"; do
    [[ $chosen == *" $s "* ]] || continue
    [[ $run == plain && $tls_only == *" $s "* ]] && continue
    [[ $s == alloc && $alloc == 0 ]] && continue
    plan+=("$s")
  done
done
total=${#plan[@]}

# Rewrites wsbridge-bench's terse section lines on stderr into "section i of n: what it
# measures"; every other line passes unchanged.
annotate() {
  local line i=0 run="" key
  while IFS= read -r line; do
    case $line in
      "wsbridge-bench: upstream TLS run") run="upstream over TLS" ;;
      "wsbridge-bench: upstream plaintext run") run="upstream over plain ws://" ;;
    esac
    key=${started_as[$line]:-}
    if [[ -n $key && $direct_only == 0 ]]; then
      i=$((i + 1))
      printf 'bench: section %d of %d (%s; %dm%02ds into the run) - %s\n' "$i" "$total" "$run" \
        $((SECONDS / 60)) $((SECONDS % 60)) "${measures[$key]}"
      continue
    fi
    printf '%s\n' "$line"
  done
}

if [[ $direct_only == 1 ]]; then
  echo "bench: direct legs only (no wsbridged): WebSocket and gRPC round trips, TLS then plaintext" >&2
else
  echo "bench: $total sections; the table of results comes at the end" >&2
fi
# 10,000 idle sessions need that many descriptors in wsbridged and in the bench
# upstream; both inherit this shell's limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
SECONDS=0
# stdout (the table) goes straight out; stderr goes through annotate.
set +e
{ "$build/bench/wsbridge-bench" --json bench-results.json "$@" 2>&1 1>&3 3>&- | annotate >&2; } 3>&1
status=${PIPESTATUS[0]}
exit "$status"
