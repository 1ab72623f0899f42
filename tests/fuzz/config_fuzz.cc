// Fuzzes the config loader: YAML text -> DaemonConfig -> defaults -> validation, the
// path an operator's file (or a file pasted into the wrong place) takes at start-up.
//
// Checked beyond "no crash":
//   - a refused config is INVALID_ARGUMENT, one error per line, each line prefixed with
//     the source name and bounded in length however long the bad value (values are cut
//     at 60 characters, messages at 1,000, paths are the schema's names);
//   - a secret's inline value never appears in an error;
//   - a config the loader accepts converts: every upstream in it passes ToEndpoint.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <yaml-cpp/yaml.h>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "bridges/core/upstream_config.h"
#include "daemon/config/config.h"

namespace {

namespace pb = google::protobuf;
namespace v1 = wsbridge::config::v1;

constexpr std::string_view kSource = "fuzz.yaml";
// Longest legitimate error line: the source and position (~40), a path of at most 32
// levels (the loader's nesting limit) of schema names or quoted map keys (each cut at
// 60 characters, ~70 with quotes and brackets) and a message cut at 1,000.
constexpr size_t kMaxLine = 40 + 32 * 70 + 1000 + 64;
// The marker every test secret carries; seeds and the dictionary put it in inline values.
constexpr std::string_view kSecretMarker = "s3cr3t";

// Calls `f` on every message of type M in the tree under `msg`.
template <class M, class F>
void ForEach(const pb::Message& msg, F&& f) {
  if (const auto* m = dynamic_cast<const M*>(&msg)) f(*m);
  const pb::Descriptor* d = msg.GetDescriptor();
  const pb::Reflection* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* fd = d->field(i);
    if (fd->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) continue;
    if (fd->is_repeated()) {
      for (int j = 0; j < r->FieldSize(msg, fd); ++j) ForEach<M>(r->GetRepeatedMessage(msg, fd, j), f);
    } else if (r->HasField(msg, fd)) {
      ForEach<M>(r->GetMessage(msg, fd), f);
    }
  }
}

size_t Count(std::string_view hay, std::string_view needle) {
  size_t n = 0;
  for (size_t p = hay.find(needle); p != std::string_view::npos; p = hay.find(needle, p + 1)) ++n;
  return n;
}

// Whether the text holds exactly one marker and it sits in a secret's inline value
// (found by the loader's own YAML -> proto step, which fills what it can even when the
// document has errors elsewhere).
bool MarkerOnlyInSecretValue(std::string_view yaml) {
  if (Count(yaml, kSecretMarker) != 1) return false;
  // An alias (*name) can reuse the value's node under another, echoed key.
  if (yaml.find('*') != std::string_view::npos) return false;
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception&) {
    return false;
  }
  v1::DaemonConfig partial;
  (void)wsbridge::config::ParseYamlInto(root, &partial, kSource);
  bool found = false;
  ForEach<v1::Secret>(partial, [&](const v1::Secret& s) {
    if (s.source_case() == v1::Secret::kValue && s.value().find(kSecretMarker) != std::string::npos) {
      found = true;
    }
  });
  return found;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // `file:` secrets are read at load time; a path such as /dev/stdin must not block the
  // fuzzer waiting on a terminal.
  if (std::freopen("/dev/null", "r", stdin) == nullptr) __builtin_trap();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<v1::DaemonConfig> config = wsbridge::config::LoadConfigString(in, kSource);
  // CONFIG_FUZZ_VERBOSE=1: print what the loader said (for seed authors).
  static const bool verbose = std::getenv("CONFIG_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
  if (!config.ok()) {
    const absl::Status& st = config.status();
    if (st.code() != absl::StatusCode::kInvalidArgument || st.message().empty()) __builtin_trap();
    for (absl::string_view line : absl::StrSplit(st.message(), '\n')) {
      if (line.substr(0, kSource.size()) != absl::string_view(kSource.data(), kSource.size())) {
        __builtin_trap();
      }
      if (line.size() > kMaxLine) __builtin_trap();
    }
    if (MarkerOnlyInSecretValue(in) &&
        st.message().find(absl::string_view(kSecretMarker.data(), kSecretMarker.size())) !=
            absl::string_view::npos) {
      __builtin_trap();
    }
    return 0;
  }
  // Accepted: defaults are in place and every upstream converts to connection options.
  if (!config->IsInitialized()) __builtin_trap();
  ForEach<v1::UpstreamConfig>(*config, [](const v1::UpstreamConfig& u) {
    if (!wsbridge::core::ToEndpoint(u, "fuzz").ok()) __builtin_trap();
  });
  return 0;
}
