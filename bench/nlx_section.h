// The NLX section of wsbridge-bench: a conversation turn through wsbridged (gRPC Send
// and Converse → wsbridged → the NLX emulator) against a direct WebSocket turn to the
// emulator plus a direct gRPC echo, in one run; and wsbridged's memory per open
// conversation. It starts its own wsbridged and `wsbridge-emulator --nlx` children.
#pragma once

#include <string>

#include <boost/json.hpp>

#include "bench_echo.grpc.pb.h"

namespace wsbridge::bench {

struct NlxSectionOptions {
  bool quick = false;
  int runs = 3;
  int samples = 5000;  // turns per leg and run
  int warmup = 300;
  std::string wsbridged;
  int io_threads = 2;
  std::string work_dir;     // config and logs go here
  std::string log_file;     // wsbridged's stderr ("" = a file in work_dir)
  bool tls = true;          // emulator behind wss:// (NLX itself is wss only)
  std::string ca_file, cert_file, key_file;
  v1::EchoService::Stub* echo = nullptr;  // the direct gRPC leg
  int conversations = 1000;               // open at once for the memory figure
};

// Runs the section; on a failure it prints why and exits (like the other sections).
boost::json::object NlxSection(const NlxSectionOptions& o);

// The section's rows of the printed table, from its JSON.
void PrintNlxTable(const boost::json::value& nlx);

}  // namespace wsbridge::bench
