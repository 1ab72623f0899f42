// The bench upstream: a DFX-wire WebSocket server with no limits, run as its own
// process (`wsbridge-bench --upstream ...`) so that wsbridged's CPU and memory are
// accounted separately from it.
//
// It answers login (0718), create (0504), subscribe (0510) and data (0506) at once,
// echoes the body of every other action (the round-trip probe uses 0100), and takes
// control frames from the bench itself:
//   9001 {"mid":M,"n":N,"rate":R,"pad":P,"tag":T}  publish N results on every
//        subscription to M at R per second, each stamped with the steady clock;
//        answers {"subs":<subscriptions to M>} when it starts.
//   9002 {}  drop every other connection abruptly (reconnect test).
//   9003 {}  answers {"conns":C,"logins":L,"subs":S}.
#pragma once

#include <string>
#include <vector>

namespace wsbridge::bench {

// Runs until SIGTERM/SIGINT; prints {"event":"upstream","url":"..."} when listening.
int RunUpstream(const std::vector<std::string>& args);

}  // namespace wsbridge::bench
