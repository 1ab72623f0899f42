// wsbridge-bench section `emogg`: the Emogg bridge against the Emogg emulator
// (wsbridge-emulator --emogg, its own process) with its own wsbridged, over wss.
//
// - Request round trip: gRPC Request("ping") through wsbridged vs a direct WebSocket
//   `ping` request to the emulator plus a direct gRPC unary echo, sampled in the same
//   run (as the DFX round trip); p50/p99 and the added latency.
// - Event fan-out: 1/10/100 gRPC Subscribe callers on one channel and key (one
//   upstream subscription); deliveries/s and publish->receive p99.
//
// Emogg allows 80 messages per 60 s, which would throttle a round-trip benchmark: the
// emulator runs with --emogg-max-messages 100000000 and the bridge's client-side
// limiter with rate_limit.max_messages 10000000 per 60 s (on, so its gate is measured;
// below the emulator's limit, so no 429). The output says so.
#pragma once

#include <string>

#include <boost/json.hpp>

#include "bench_echo.grpc.pb.h"

namespace wsbridge::bench {

struct EmoggBenchConfig {
  bool quick = false;
  int runs = 3;
  int rt_samples = 5000;
  int warmup = 300;
  int io_threads = 2;           // wsbridged runtime.io_threads
  std::string wsbridged;        // daemon binary
  std::string emulator;         // wsbridge-emulator binary
  std::string cert_file, key_file, ca_file;  // the emulator's wss certificate and its CA
  std::string daemon_log;       // wsbridged's stderr ("" = a temp file)
};

// Runs the section; dies (exit 1, children killed) when a leg fails.
boost::json::object EmoggSection(const EmoggBenchConfig& c, v1::EchoService::Stub& echo);

// Prints the section's block of the results table.
void PrintEmoggTable(const boost::json::value& section);

}  // namespace wsbridge::bench
