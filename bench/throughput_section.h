// The throughput section of wsbridge-bench: an in-process, asynchronous load generator
// (like ghz) driving bridged DFX Calls with many calls in flight, next to the same load on
// the two direct legs the bridge stands for:
//   - the direct gRPC echo server (`wsbridge-bench --grpc-echo`, unary Echo), driven by the
//     same generator (completion-queue API, two client threads with a queue each, several
//     channels that are separate HTTP/2 connections);
//   - a direct WebSocket client pipelining the same number of requests over ONE connection
//     to the bench upstream (bridged Calls of one session share one upstream socket too),
//     asynchronous on a thread of its own so that its CPU can be read per thread.
// For each concurrency (1, 32, 256 calls in flight) it reports calls/s, latency percentiles
// and CPU per call of each process, and the ratio wsbridged / (gRPC server + WebSocket
// client). Then it offers bridged Calls at fixed rates (open loop: send times scheduled in
// advance, latency measured from the scheduled time, so a stall is not hidden).
#pragma once

#include <sys/types.h>

#include <string>

#include <boost/json.hpp>

namespace wsbridge::bench {

struct ThroughputOptions {
  bool quick = false;
  int runs = 3;
  std::string body;             // JSON body of each call (0100, echoed by the upstream)
  std::string daemon_target;    // wsbridged's gRPC address (a DFX bridge, allow_call_token)
  pid_t daemon_pid = -1;
  std::string echo_target;      // the direct gRPC echo server
  pid_t echo_pid = -1;
  std::string upstream_url;     // the bench upstream (ws:// or wss://)
  pid_t upstream_pid = -1;
  std::string ca_file;          // verifies a wss:// upstream
};

// Measures; exits the process with a message on a failure (like the other sections).
boost::json::object ThroughputSection(const ThroughputOptions& o);

// Prints the section's block of the result table.
void PrintThroughputTable(const boost::json::value& section);

}  // namespace wsbridge::bench
