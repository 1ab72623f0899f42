// `wsbridgectl call`: any method of the daemon, requests and responses as JSON, the
// method's types taken from server reflection.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <grpcpp/channel.h>

#include "absl/status/status.h"
#include "tools/wsbridgectl/options.h"

namespace wsbridge::ctl {

// Exit codes shared by every command.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;  // a non-OK status, NOT_SERVING, no connection
inline constexpr int kExitUsage = 2;   // bad flags or arguments, JSON that does not parse

// Splits a byte stream into top-level JSON values: an object or array ends at its
// closing bracket (one per line, several on a line, or one spread over many lines all
// work); anything else ends at the end of its line, so the parser can name the error.
class JsonSplitter {
 public:
  void Feed(std::string_view bytes);
  // The next complete value, if one is buffered.
  std::optional<std::string> Next();
  // At end of input: what is left (an unfinished value), if anything.
  std::optional<std::string> Rest();

 private:
  std::string pending_;  // bytes fed but not yet scanned
  std::string current_;  // the value being scanned
  int depth_ = 0;
  bool in_string_ = false;
  bool escaped_ = false;
};

// Runs `method` with `json_argument` (nullopt or "-" = read stdin) and prints the
// responses, one JSON object per line on stdout. Returns the exit code; errors are
// printed on stderr.
int RunCall(const GlobalOptions& options, const std::shared_ptr<grpc::Channel>& channel,
            const google::protobuf::MethodDescriptor& method,
            const std::optional<std::string>& json_argument);

}  // namespace wsbridge::ctl
