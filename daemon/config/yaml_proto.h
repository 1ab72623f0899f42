// Generic YAML -> protobuf conversion driven by descriptors, so that every error names
// the exact field path and source position. Deliberately not via JSON: a JSON detour
// loses positions and turns "unknown key" into an opaque parse failure.
//
// Field rules come from the `(wsbridge.config.v1.rules)` field option (options.proto):
// required, min/max, one_of, secret and default_value.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <google/protobuf/message.h>
#include <yaml-cpp/mark.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace YAML {
class Node;
}

namespace wsbridge::config {

// Where each value came from, keyed by field path ("bridges[0].dfx.upstream.url").
class SourceMap {
 public:
  void Record(const std::string& path, const YAML::Mark& mark);
  // Position of `path`, else of its nearest recorded ancestor; nullopt when none is known.
  std::optional<YAML::Mark> Find(absl::string_view path) const;
  bool Contains(absl::string_view path) const;

 private:
  std::map<std::string, YAML::Mark, std::less<>> marks_;
};

// Collects errors, one line each: "<source>:<line>:<col>: <path>: <message>".
class Diagnostics {
 public:
  explicit Diagnostics(std::string source_name) : source_name_(std::move(source_name)) {}

  void Add(const std::optional<YAML::Mark>& mark, absl::string_view path,
           absl::string_view message);
  // Positions the error at `path` (or its nearest ancestor) as recorded in `sources`.
  void AddAt(const SourceMap& sources, absl::string_view path, absl::string_view message);

  bool empty() const { return lines_.empty(); }
  // OK when empty, else INVALID_ARGUMENT with every error on its own line, in file order.
  absl::Status ToStatus() const;

 private:
  std::string source_name_;
  std::vector<std::string> lines_;
  std::vector<std::pair<int, int>> positions_;  // (line, column) of each; (-1, -1) when unknown
};

// Converts `node` into `message` (which should be empty), checking every key, type and
// field rule. Errors go to `diagnostics`; positions of every value are recorded in
// `sources` when given. `path` is the path of `node` itself ("" for the document root).
void ParseYamlInto(const YAML::Node& node, google::protobuf::Message* message,
                   const std::string& path, Diagnostics& diagnostics,
                   SourceMap* sources = nullptr);

// Sets every unset field that has a `(rules).default_value` ("unset": an absent message,
// a zero number, an empty string). Singular sub-messages outside oneofs whose type
// (transitively) carries defaults are created so their defaults apply; other absent
// messages stay absent because their presence means something (e.g. `tls`).
// Fails only when a default in the schema itself does not parse or breaks a rule.
absl::Status ApplyDefaults(google::protobuf::Message* message);

// "250ms", "1.5s", "2m", "1h", "1m30s" (units ns, us, ms, s, m, h). Bare numbers are
// refused: "10" could mean seconds or milliseconds.
absl::StatusOr<std::chrono::nanoseconds> ParseDuration(absl::string_view text);
// The shortest exact form: 500ms, 30s, 5m, 1h, 1.5s.
std::string FormatDuration(std::chrono::nanoseconds d);

}  // namespace wsbridge::config
