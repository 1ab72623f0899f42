// The Nexora section of wsbridge-bench: a long scripted agent answer streamed through
// the bridge (gRPC SendMessage -> wsbridged -> Nexora emulator) against the same answer
// read by a direct WebSocket client from the same emulator, in one run. Measures the
// time to the first chunk and the chunk throughput (chunks/s, content bytes/s).
//
// The emulator runs in a child process of its own (`wsbridge-bench --nexora-upstream`)
// with step_delay 0, so the answer streams as fast as the sockets take it and the
// figures are the bridge's, not the script's pacing.
#pragma once

#include <string>
#include <vector>

#include <boost/json.hpp>

namespace wsbridge::bench {

struct NexoraBenchOptions {
  bool quick = false;
  int runs = 3;
  std::string wsbridged;   // the daemon binary
  bool tls = false;        // wss:// upstream (the emulator serves cert_file/key_file)
  std::string ca_file, cert_file, key_file;
  std::string work_dir;    // config and log files go here
  std::string keep_logs;   // wsbridged's stderr goes here ("" = a file in work_dir)
  int io_threads = 2;
};

// Starts its own emulator and wsbridged, measures, stops both. Exits the process with
// a message on a failure (like the other sections).
boost::json::object NexoraSection(const NexoraBenchOptions& o);

// Prints the section's block of the result table.
void PrintNexoraTable(const boost::json::value& section);

// Internal mode `--nexora-upstream [--tls-cert F --tls-key F] --chunks N --chunk-bytes B`:
// serves the Nexora emulator with an answer of N chunks of B content bytes, prints
// {"event":"nexora-upstream","url":...} and runs until SIGTERM/SIGINT.
int RunNexoraUpstream(const std::vector<std::string>& args);

}  // namespace wsbridge::bench
