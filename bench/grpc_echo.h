// The direct gRPC leg: an echo server on the completion-queue API with one queue and
// the one thread that drains it (the API and layout wsbridged serves with), run as its
// own process: `wsbridge-bench --grpc-echo`. Prints {"event":"grpc-echo","port":N} when
// listening; runs until SIGTERM/SIGINT.
#pragma once

#include <string>
#include <vector>

namespace wsbridge::bench {

int RunGrpcEcho(const std::vector<std::string>& args);

}  // namespace wsbridge::bench
