// The daemon's config: YAML on disk, checked against the proto schema in
// proto/wsbridge/config/v1 (field rules and defaults live on the fields themselves).
//
// Every problem is reported, one per line, as
//   <file>:<line>:<col>: <path>: <what is wrong> (<what to do>)
// e.g. `demo.yaml:12:5: bridges[0].dfx.upstream.urll: unknown key "urll" (...)`.
// Secret values never appear in these messages.
#pragma once

#include <string>
#include <string_view>

#include <google/protobuf/message.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/upstream_config.h"
#include "wsbridge/config/v1/common.pb.h"
#include "wsbridge/config/v1/daemon.pb.h"

namespace YAML {
class Node;
}

namespace wsbridge::config {

// Reads, parses, applies defaults and validates a config file, and resolves every
// secret once (registering the values for log redaction). INVALID_ARGUMENT lists every
// error found; NOT_FOUND / PERMISSION_DENIED when the file itself cannot be read.
absl::StatusOr<v1::DaemonConfig> LoadConfigFile(const std::string& path);
// The same for YAML text; `source_name` prefixes every error (usually the file name).
absl::StatusOr<v1::DaemonConfig> LoadConfigString(std::string_view yaml,
                                                  std::string_view source_name);

// Generic piece: converts one YAML node into any message of the config schema, checking
// keys, types and field rules (not cross-field checks nor defaults). Errors name
// `source_name` and field paths below `path`.
absl::Status ParseYamlInto(const YAML::Node& node, google::protobuf::Message* message,
                           std::string_view source_name, const std::string& path = "");

// Sets every documented default (`(rules).default_value` in the schema) on unset fields,
// at any depth. LoadConfig* already does this; bridges may call it on their own config
// messages when built by hand (tests).
absl::Status ApplyConfigDefaults(google::protobuf::Message* message);

// Secrets, URL checks and connection options are bridges/core/upstream_config.h's; the
// loader uses them too.
using core::CheckUpstreamUrl;
using core::ResolveSecret;
using core::ToConnectionOptions;

}  // namespace wsbridge::config
