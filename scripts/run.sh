#!/usr/bin/env bash
# The one command that runs the main job: installs what is missing, builds wsbridged and
# the bundled upstream emulator when needed, starts the emulator on loopback with all
# four upstream APIs (DFX, NLX, Emogg, Nexora), runs wsbridged with
# deploy/config/demo.yaml, waits until every bridge is serving and says where to connect.
# No internet, no credentials. Ctrl-C stops wsbridged (graceful drain), then the emulator.
#
# Environment (all optional), e.g. to run a second copy beside a running demo:
#   WSBRIDGE_BUILD_DIR       use the wsbridged and wsbridge-emulator already built in this
#                            build directory; nothing is installed or built
#                            (default: build/run, set up and built here)
#   WSBRIDGE_GRPC_LISTEN     gRPC over TCP (default 127.0.0.1:50051; port 0 = a free one)
#   WSBRIDGE_UNIX_SOCKET     gRPC Unix socket (default /tmp/wsbridge/wsbridged.sock)
#   WSBRIDGE_ADMIN_LISTEN    admin HTTP (default 127.0.0.1:9090; port 0 = a free one)
#   WSBRIDGE_EMULATOR_PORTS  "fixed" (default: the ports in demo.yaml, 18081-18084) or
#                            "0" (free ports, written into a copy of demo.yaml)
#   WSBRIDGE_READY_TIMEOUT   seconds to wait for every bridge to serve (default 60)
# When an address differs from demo.yaml's, wsbridged runs a copy of it with the address replaced.
#
# Exit status: 0 after Ctrl-C (SIGINT) or SIGTERM once both processes stopped cleanly;
# 1 when either fails to start, dies early, or does not stop cleanly; 2 for bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "run: $*" >&2; }
fail() { say "$*"; exit 1; }

if [[ $# -gt 0 ]]; then
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: scripts/run.sh   (settings through the environment: see --help)" >&2
       exit 2 ;;
  esac
fi

demo_config=deploy/config/demo.yaml
# What demo.yaml says; the emulator listens there unless WSBRIDGE_EMULATOR_PORTS=0.
apis=(dfx nlx emogg nexora)
declare -A demo_url=(
  [dfx]=ws://127.0.0.1:18081
  [nlx]=ws://127.0.0.1:18082
  [emogg]=ws://127.0.0.1:18083/ws/v1
  [nexora]=ws://127.0.0.1:18084
)
default_grpc=127.0.0.1:50051
default_unix=/tmp/wsbridge/wsbridged.sock
default_admin=127.0.0.1:9090
grpc_listen=${WSBRIDGE_GRPC_LISTEN:-$default_grpc}
unix_socket=${WSBRIDGE_UNIX_SOCKET:-$default_unix}
admin_listen=${WSBRIDGE_ADMIN_LISTEN:-$default_admin}
emulator_ports=${WSBRIDGE_EMULATOR_PORTS:-fixed}
ready_timeout=${WSBRIDGE_READY_TIMEOUT:-60}
[[ $emulator_ports == fixed || $emulator_ports == 0 ]] ||
  fail "WSBRIDGE_EMULATOR_PORTS must be \"fixed\" or \"0\", not \"$emulator_ports\""
[[ $ready_timeout =~ ^[1-9][0-9]{0,4}$ ]] ||
  fail "WSBRIDGE_READY_TIMEOUT must be whole seconds, e.g. 60, not \"$ready_timeout\""
bad_chars='["\\[:cntrl:]]'
for v in "$grpc_listen" "$unix_socket" "$admin_listen"; do
  [[ $v =~ $bad_chars ]] && fail "addresses and paths must not contain quotes, backslashes or control characters: $v"
done

# --- Build --------------------------------------------------------------------------
if [[ -n ${WSBRIDGE_BUILD_DIR:-} ]]; then
  build=$WSBRIDGE_BUILD_DIR
  for bin in daemon/wsbridged tests/upstreams/wsbridge-emulator; do
    [[ -x $build/$bin ]] || fail "WSBRIDGE_BUILD_DIR=$build has no $bin: build it there" \
      "(ninja -C $build wsbridged wsbridge-emulator) or unset WSBRIDGE_BUILD_DIR to build in build/run"
  done
else
  build=build/run
  bash scripts/setup.sh --runtime-only
  if [[ -x $build/daemon/wsbridged && -x $build/tests/upstreams/wsbridge-emulator ]]; then
    say "checking that wsbridged and wsbridge-emulator in $build are up to date"
  else
    say "building wsbridged, wsbridge-emulator and wsbridgectl (Release) in $build."
    say "The first build takes several minutes (C++ with gRPC); later runs only rebuild what changed."
  fi
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DWSBRIDGE_BUILD_TESTS=OFF -DWSBRIDGE_BUILD_BENCH=OFF >/dev/null
  ninja -C "$build" wsbridged wsbridge-emulator wsbridgectl
fi
wsbridged=$build/daemon/wsbridged
emulator=$build/tests/upstreams/wsbridge-emulator

# --- Processes ----------------------------------------------------------------------
rundir=$(mktemp -d "${TMPDIR:-/tmp}/wsbridge-run.XXXXXX")
emulator_pid=""
daemon_pid=""
stop_signal=""

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# Waits for the process to exit and sets `exit_status`. A second Ctrl-C while
# wsbridged drains is passed on to it (it then exits at once).
exit_status=0
wait_exit() {
  local pid=$1 name=$2 status
  while :; do
    local before=$stop_signal
    stop_signal=""
    status=0
    wait "$pid" 2>/dev/null || status=$?
    if alive "$pid"; then  # the wait was interrupted by a signal
      if [[ $name == wsbridged ]]; then
        say "stopping wsbridged at once (second signal)"
        kill -TERM "$pid" 2>/dev/null || true
      fi
      stop_signal=${stop_signal:-$before}
      continue
    fi
    stop_signal=${stop_signal:-$before}
    exit_status=$status
    return 0
  done
}

# Stops both in order (wsbridged first: it drains its calls and closes its upstream
# sessions while the emulator still answers) and exits 0 only if both exited 0.
stop_all() {
  local code=0
  if alive "$daemon_pid"; then
    say "stopping wsbridged (graceful drain; Ctrl-C again stops it at once)"
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait_exit "$daemon_pid" wsbridged
    if [[ $exit_status -ne 0 ]]; then
      say "wsbridged exited with status $exit_status while stopping"
      code=1
    fi
  fi
  daemon_pid=""
  if alive "$emulator_pid"; then
    say "stopping wsbridge-emulator"
    kill -TERM "$emulator_pid" 2>/dev/null || true
    wait_exit "$emulator_pid" wsbridge-emulator
    if [[ $exit_status -ne 0 ]]; then
      say "wsbridge-emulator exited with status $exit_status while stopping"
      code=1
    fi
  fi
  emulator_pid=""
  return $code
}

# Nothing outlives the script, whatever ends it (an error above included).
cleanup() {
  stop_all || true
  rm -rf "$rundir"
}
trap cleanup EXIT
trap 'stop_signal=INT' INT
trap 'stop_signal=TERM' TERM
trap 'stop_signal=HUP' HUP

# Called when one process has exited: report it, stop the other, exit 1. `status` is
# given when the process was already reaped (wait -n), else it is collected here.
died() {
  local pid=$1 name=$2 when=$3 status=${4:-} hint=${5:-}
  if [[ -z $status ]]; then
    status=0
    wait "$pid" 2>/dev/null || status=$?
  fi
  if [[ $name == wsbridged ]]; then daemon_pid=""; else emulator_pid=""; fi
  local how="with status $status"
  ((status > 128)) && how="(killed by SIG$(kill -l $((status - 128)) 2>/dev/null || echo "$((status - 128))"))"
  say "$name exited $when $how; its own messages, if any, are above.${hint:+ $hint}"
  stop_all || true
  exit 1
}

# Ends the script cleanly when a stop signal came in while starting up.
check_stop() {
  if [[ -n $stop_signal ]]; then
    say "SIG$stop_signal before the demo was ready: stopping"
    stop_all && exit 0
    exit 1
  fi
}

# Polls `condition` (a function) every 0.1 s until it succeeds; fails when either
# process dies, a stop signal arrives, or `timeout` seconds pass.
wait_until() {
  local condition=$1 timeout=$2 what=$3 deadline=$((SECONDS + $2))
  until $condition; do
    check_stop
    alive "$emulator_pid" || died "$emulator_pid" wsbridge-emulator "while starting" "" \
      "$emulator_hint"
    if [[ -n $daemon_pid ]] && ! alive "$daemon_pid"; then
      died "$daemon_pid" wsbridged "while starting" "" "$daemon_hint"
    fi
    if ((SECONDS >= deadline)); then
      say "$what did not happen within ${timeout}s${last_reason:+ ($last_reason)}"
      stop_all || true
      exit 1
    fi
    sleep 0.1
  done
}

# The emulator: all four APIs, with the demo credentials that demo.yaml holds.
emulator_args=()
for api in "${apis[@]}"; do
  if [[ $emulator_ports == 0 ]]; then
    listen=127.0.0.1:0
  else
    listen=${demo_url[$api]#ws://}
    listen=${listen%%/*}
  fi
  emulator_args+=("--$api" "$listen")
done
emulator_args+=(--dfx-token demo-device-token
                --nlx-api-key nlx-emulator-api-key
                --nlx-deployment-key nlx-emulator-deployment
                --nlx-channel-key nlx-emulator-channel-en-US
                --emogg-token demo-emogg-token --emogg-event-interval 1000
                --nexora-api-key nxr_demo_key)
say "starting wsbridge-emulator (dfx, nlx, emogg, nexora on loopback)"
emulator_hint="Ports in use? Another demo may be running: set WSBRIDGE_EMULATOR_PORTS=0."
daemon_hint="Ports in use? Set WSBRIDGE_GRPC_LISTEN and WSBRIDGE_ADMIN_LISTEN (port 0 = a free one) and WSBRIDGE_UNIX_SOCKET."
# setsid: its own session, so a terminal's Ctrl-C reaches only this script, which then
# stops the two processes in order.
: >"$rundir/emulator.out"
setsid "$emulator" "${emulator_args[@]}" >"$rundir/emulator.out" &
emulator_pid=$!
last_reason=""
emulator_listening() { [[ $(grep -c '"url"' "$rundir/emulator.out") -ge ${#apis[@]} ]]; }
wait_until emulator_listening 30 "wsbridge-emulator listening"
emulator_hint=""

# The config: demo.yaml itself, or a copy with the overridden addresses.
config_text=$(<"$demo_config")
replace() {  # replace OLD NEW: exactly one occurrence of OLD in demo.yaml
  local old=$1 new=$2 rest=${config_text//"$1"/}
  (((${#config_text} - ${#rest}) / ${#old} == 1)) ||
    fail "$demo_config does not contain \"$old\" exactly once: update scripts/run.sh to match it"
  [[ $old == "$new" ]] || config_text=${config_text/"$old"/"$new"}
}
for api in "${apis[@]}"; do
  url=$(grep -o "\"api\":\"$api\",\"url\":\"[^\"]*\"" "$rundir/emulator.out" | sed 's/.*"url":"//; s/"$//')
  [[ -n $url ]] || fail "wsbridge-emulator printed no $api URL: $(cat "$rundir/emulator.out")"
  replace "url: ${demo_url[$api]}" "url: $url"
done
replace "listen: \"$default_grpc\"" "listen: \"$grpc_listen\""
if [[ $unix_socket == "$default_unix" ]]; then
  replace "unix_socket: $default_unix" "unix_socket: $default_unix"
else
  replace "unix_socket: $default_unix" "unix_socket: \"$unix_socket\""
fi
replace "listen: \"$default_admin\"" "listen: \"$admin_listen\""
config=$demo_config
if [[ $config_text != "$(<"$demo_config")" ]]; then
  config=$rundir/demo.yaml
  printf '%s\n' "$config_text" >"$config"
fi

mkdir -p "$(dirname "$unix_socket")"
say "starting wsbridged --config $config"
: >"$rundir/wsbridged.out"
setsid "$wsbridged" --config "$config" >"$rundir/wsbridged.out" &
daemon_pid=$!
daemon_listening() { grep -q '"event":"listening"' "$rundir/wsbridged.out"; }
wait_until daemon_listening 30 "wsbridged listening"
daemon_hint=""
listening=$(grep -m1 '"event":"listening"' "$rundir/wsbridged.out")
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$listening"; }
grpc_address=$(field grpc)
unix_address=$(field unix)
admin_address=$(field admin)
[[ -n $admin_address ]] || fail "wsbridged reported no admin listener: $listening"

# Ready = /readyz answers 200: wsbridged serves and every bridge reports SERVING
# (DFX and Emogg once their upstream session has logged in).
last_reason=""
daemon_ready() {
  local fd line reply=""
  { exec {fd}<>"/dev/tcp/${admin_address%:*}/${admin_address##*:}"; } 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin_address" >&"$fd"
  while IFS= read -r -t 5 line <&"$fd"; do reply+="${line%$'\r'}"$'\n'; done
  exec {fd}>&-
  last_reason=$(tail -n1 <<<"$reply")
  [[ $reply == "HTTP/1."?" 200 "* ]]
}
wait_until daemon_ready "$ready_timeout" "every bridge serving (admin /readyz)"

ctl_target=${grpc_address:-"unix:$unix_address"}
ctl=$build/tools/wsbridgectl/wsbridgectl
[[ -x $ctl ]] || ctl="wsbridgectl"  # a WSBRIDGE_BUILD_DIR without it: build it there
cat <<EOF

wsbridge demo is ready: bridges dfx, nlx, emogg and nexora are serving, in front of wsbridge-emulator.
  gRPC (TCP):   ${grpc_address:-none}
  gRPC (Unix):  ${unix_address:+unix:$unix_address}
  admin HTTP:   http://$admin_address  (/metrics, /healthz, /readyz)
  config:       $config
  processes:    wsbridged pid $daemon_pid, wsbridge-emulator pid $emulator_pid
Try from another shell (README.md has a tour of all four bridges):
  $ctl --target $ctl_target health
  $ctl --target $ctl_target call wsbridge.nlx.v1.NlxService/Send '{"turn":{"text":"hello"}}'
Ctrl-C stops wsbridged (graceful drain), then the emulator.

EOF

# Run until a stop signal or until either process dies.
# (wait -n returns when one of them exits, or at once when a trapped signal arrives.)
while [[ -z $stop_signal ]]; do
  unset exited
  status=0
  wait -n -p exited "$daemon_pid" "$emulator_pid" || status=$?
  case ${exited:-} in
    "$daemon_pid") died "$daemon_pid" wsbridged unexpectedly "$status" ;;
    "$emulator_pid") died "$emulator_pid" wsbridge-emulator unexpectedly "$status" ;;
  esac
done
say "SIG$stop_signal received"
stop_all || exit 1
say "stopped cleanly"
exit 0
