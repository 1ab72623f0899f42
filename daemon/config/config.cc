#include "daemon/config/config.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/duration.pb.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "daemon/config/yaml_proto.h"
#include "wsbridge/config/v1/dfx.pb.h"

namespace wsbridge::config {
namespace {

namespace pb = google::protobuf;

constexpr size_t kMaxConfigFileBytes = 4 * 1024 * 1024;
// sockaddr_un::sun_path holds 108 bytes including the terminating NUL.
constexpr size_t kMaxUnixSocketPath = 107;

// Values echoed in errors are cut: a bad value may be megabytes long (a file pasted into
// the wrong key).
constexpr size_t kMaxEchoBytes = 60;

// Line breaks and control bytes are escaped: an error stays one printable line.
std::string Quoted(absl::string_view s) {
  const bool cut = s.size() > kMaxEchoBytes;
  std::string out = "\"";
  for (unsigned char c : cut ? s.substr(0, kMaxEchoBytes) : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (!cut) return absl::StrCat(out, "\"");
  return absl::StrCat(out, "...\" (", s.size(), " bytes)");
}

core::Duration ToDuration(const pb::Duration& d) {
  return std::chrono::seconds(d.seconds()) + std::chrono::nanoseconds(d.nanos());
}

absl::Status CheckReadable(const std::string& path) {
  if (::access(path.c_str(), R_OK) == 0) return absl::OkStatus();
  return core::FileError(errno, "", path);
}

// host:port, with IPv6 hosts in brackets. Port 0 lets the kernel pick one (tests).
bool IsHostPort(absl::string_view s) {
  absl::string_view host;
  absl::string_view port;
  if (absl::StartsWith(s, "[")) {
    size_t close = s.find(']');
    if (close == absl::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') {
      return false;
    }
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    size_t colon = s.rfind(':');
    if (colon == absl::string_view::npos) return false;
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
    if (host.find(':') != absl::string_view::npos) return false;
  }
  uint32_t port_number = 0;
  return !host.empty() && !port.empty() && port.size() <= 5 &&
         port.find_first_not_of("0123456789") == absl::string_view::npos &&
         absl::SimpleAtoi(port, &port_number) && port_number <= 65535;
}

void CheckListen(absl::string_view value, const std::string& path, const SourceMap& sources,
                 Diagnostics& diag) {
  if (value.empty() || IsHostPort(value)) return;
  diag.AddAt(sources, path,
             absl::StrCat(Quoted(value),
                          " is not host:port (e.g. \"127.0.0.1:50051\" or \"[::1]:50051\")"));
}

void CheckFile(const std::string& file, const std::string& path, const SourceMap& sources,
               Diagnostics& diag) {
  if (file.empty()) return;
  if (absl::Status s = CheckReadable(file); !s.ok()) diag.AddAt(sources, path, s.message());
}

bool IsHeaderToken(absl::string_view name) {
  if (name.empty()) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) &&
        absl::string_view("!#$%&'*+-.^_`|~").find(c) == absl::string_view::npos) {
      return false;
    }
  }
  return true;
}

// Headers the WebSocket handshake sets itself; letting config override them would break it.
bool IsReservedHeader(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  return lower == "host" || lower == "upgrade" || lower == "connection" ||
         lower == "content-length" || lower == "transfer-encoding" ||
         absl::StartsWith(lower, "sec-websocket-");
}

bool IsOctalMode(absl::string_view s) {
  if (s.size() < 3 || s.size() > 4) return false;
  if (s.find_first_not_of("01234567") != absl::string_view::npos) return false;
  return s.size() == 3 || s.front() == '0';
}

class Validator {
 public:
  Validator(const SourceMap& sources, Diagnostics& diag) : sources_(sources), diag_(diag) {}

  void Run(const v1::DaemonConfig& config) {
    Server(config.server());
    CheckListen(config.admin().listen(), "admin.listen", sources_, diag_);
    // Port 0 asks the kernel for a free port each time, so two ":0" listeners never clash.
    if (!config.admin().listen().empty() && config.admin().listen() == config.server().listen() &&
        !absl::EndsWith(config.admin().listen(), ":0")) {
      Error("admin.listen", "is the same address as server.listen (use another port)");
    }
    Shutdown(config.shutdown());
    Bridges(config);
    Walk(config, "");
  }

 private:
  void Error(const std::string& path, absl::string_view message) {
    diag_.AddAt(sources_, path, message);
  }

  void Server(const v1::ServerConfig& s) {
    if (s.listen().empty() && s.unix_socket().empty()) {
      Error("server",
            "neither listen nor unix_socket is set, so no caller could connect (set listen: "
            "\"127.0.0.1:50051\" and/or unix_socket: /run/wsbridge/wsbridged.sock)");
    }
    CheckListen(s.listen(), "server.listen", sources_, diag_);
    if (s.unix_socket().size() > kMaxUnixSocketPath) {
      Error("server.unix_socket", absl::StrCat("is ", s.unix_socket().size(),
                                               " bytes long, above the limit of ",
                                               kMaxUnixSocketPath, " for Unix socket paths "
                                               "(use a shorter path)"));
    }
    if (!IsOctalMode(s.unix_socket_mode())) {
      Error("server.unix_socket_mode",
            absl::StrCat(Quoted(s.unix_socket_mode()),
                         " is not an octal file mode (write 3 or 4 octal digits, quoted, "
                         "e.g. \"0660\")"));
    }
    if (s.has_tls()) {
      const v1::ServerTlsConfig& tls = s.tls();
      if (s.listen().empty()) {
        Error("server.tls", "applies to the TCP listener only, but server.listen is not set "
                            "(set server.listen or remove server.tls)");
      }
      if (tls.require_client_cert() && tls.client_ca_file().empty()) {
        Error("server.tls.require_client_cert",
              "needs client_ca_file (set server.tls.client_ca_file to the CA bundle that "
              "client certificates chain to)");
      }
      CheckFile(tls.cert_file(), "server.tls.cert_file", sources_, diag_);
      CheckFile(tls.key_file(), "server.tls.key_file", sources_, diag_);
      CheckFile(tls.client_ca_file(), "server.tls.client_ca_file", sources_, diag_);
    }
  }

  void Shutdown(const v1::ShutdownConfig& s) {
    core::Duration drain = ToDuration(s.drain_timeout());
    core::Duration deadline = ToDuration(s.deadline());
    if (deadline <= drain) {
      std::string path = sources_.Contains("shutdown.deadline") ? "shutdown.deadline"
                                                                : "shutdown.drain_timeout";
      Error(path, absl::StrCat("deadline ", FormatDuration(deadline),
                               " must exceed drain_timeout ", FormatDuration(drain),
                               " (raise shutdown.deadline or lower shutdown.drain_timeout)"));
    }
  }

  void Bridges(const v1::DaemonConfig& config) {
    std::map<std::string, int> names;
    for (int i = 0; i < config.bridges_size(); ++i) {
      const v1::BridgeConfig& b = config.bridges(i);
      std::string path = absl::StrCat("bridges[", i, "]");
      if (!b.name().empty()) {
        bool valid = true;
        for (char c : b.name()) {
          if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-' &&
              c != '.') {
            valid = false;
          }
        }
        if (!valid) {
          Error(path + ".name",
                absl::StrCat(Quoted(b.name()), " may only contain letters, digits, '_', '-' "
                                               "and '.' (it appears in metrics and logs)"));
        }
        auto [it, inserted] = names.emplace(b.name(), i);
        if (!inserted) {
          Error(path + ".name", absl::StrCat(Quoted(b.name()), " is already used by bridges[",
                                             it->second, "] (bridge names must be unique)"));
        }
      }
      if (b.kind_case() == v1::BridgeConfig::KIND_NOT_SET) {
        const pb::OneofDescriptor* kind = v1::BridgeConfig::descriptor()->FindOneofByName("kind");
        std::string kinds;
        for (int k = 0; k < kind->field_count(); ++k) {
          absl::StrAppend(&kinds, k ? ", " : "", kind->field(k)->name());
        }
        Error(path, absl::StrCat("no bridge kind is set (add one of: ", kinds, ")"));
      }
    }
  }

  // Type-driven checks wherever a message type appears in the tree.
  void Walk(const pb::Message& msg, const std::string& path) {
    if (const auto* u = dynamic_cast<const v1::UpstreamConfig*>(&msg)) Upstream(*u, path);
    if (const auto* s = dynamic_cast<const v1::Secret*>(&msg)) Secret(*s, path);
    if (const auto* d = dynamic_cast<const v1::DfxBridgeConfig*>(&msg)) Dfx(*d, path);
    const pb::Descriptor* desc = msg.GetDescriptor();
    const pb::Reflection* refl = msg.GetReflection();
    for (int i = 0; i < desc->field_count(); ++i) {
      const pb::FieldDescriptor* f = desc->field(i);
      if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE || f->is_map()) continue;
      std::string child = path.empty() ? f->name() : absl::StrCat(path, ".", f->name());
      if (f->is_repeated()) {
        for (int j = 0; j < refl->FieldSize(msg, f); ++j) {
          Walk(refl->GetRepeatedMessage(msg, f, j), absl::StrCat(child, "[", j, "]"));
        }
      } else if (refl->HasField(msg, f)) {
        Walk(refl->GetMessage(msg, f), child);
      }
    }
  }

  void Upstream(const v1::UpstreamConfig& u, const std::string& path) {
    if (absl::Status s = CheckUpstreamUrl(u); !s.ok() && !u.url().empty()) {
      Error(path + ".url", s.message());
    }
    if (u.has_tls()) {
      const v1::UpstreamTlsConfig& tls = u.tls();
      if (tls.cert_file().empty() != tls.key_file().empty()) {
        Error(path + ".tls", "cert_file and key_file go together (set both for mTLS, or neither)");
      }
      CheckFile(tls.ca_file(), path + ".tls.ca_file", sources_, diag_);
      CheckFile(tls.cert_file(), path + ".tls.cert_file", sources_, diag_);
      CheckFile(tls.key_file(), path + ".tls.key_file", sources_, diag_);
    }
    if (ToDuration(u.backoff().initial()) > ToDuration(u.backoff().max())) {
      Error(path + ".backoff.initial",
            absl::StrCat(FormatDuration(ToDuration(u.backoff().initial())),
                         " is above backoff.max ", FormatDuration(ToDuration(u.backoff().max())),
                         " (lower initial or raise max)"));
    }
    for (const auto& [name, value] : u.headers()) {
      std::string hpath = absl::StrCat(path, ".headers[", Quoted(name), "]");
      if (!IsHeaderToken(name)) {
        Error(hpath, "is not a valid HTTP header name (use letters, digits and '-')");
      } else if (IsReservedHeader(name)) {
        Error(hpath, "is set by the WebSocket handshake itself (remove it)");
      }
      if (value.find_first_of(std::string("\r\n\0", 3)) != std::string::npos) {
        Error(hpath, "value contains a line break or NUL (header values are one line)");
      }
    }
  }

  void Secret(const v1::Secret& s, const std::string& path) {
    std::string source_path = path;
    switch (s.source_case()) {
      case v1::Secret::kEnv: source_path += ".env"; break;
      case v1::Secret::kFile: source_path += ".file"; break;
      case v1::Secret::kValue: source_path += ".value"; break;
      case v1::Secret::SOURCE_NOT_SET: break;
    }
    // Resolving here makes a missing variable a start-up error instead of a failure on
    // the first connect, and registers the value for log redaction early.
    if (absl::StatusOr<std::string> v = ResolveSecret(s); !v.ok()) {
      Error(source_path, v.status().message());
    }
  }

  void Dfx(const v1::DfxBridgeConfig& d, const std::string& path) {
    if (!d.has_device_token() && !d.allow_call_token()) {
      Error(path, "has no device_token and allow_call_token is false, so no call could "
                  "authenticate (set device_token, or allow_call_token: true)");
    }
  }

  const SourceMap& sources_;
  Diagnostics& diag_;
};

// Records where each document starts; builds nothing.
class DocumentStarts : public YAML::EventHandler {
 public:
  std::optional<YAML::Mark> last() const { return last_; }
  void OnDocumentStart(const YAML::Mark& mark) override {
    last_ = mark.is_null() ? std::nullopt : std::optional<YAML::Mark>(mark);
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}

 private:
  std::optional<YAML::Mark> last_;
};

}  // namespace

absl::StatusOr<v1::DaemonConfig> LoadConfigFile(const std::string& path) {
  absl::StatusOr<std::string> text = core::ReadSmallFile(path, kMaxConfigFileBytes, "config file");
  if (!text.ok()) return text.status();
  return LoadConfigString(*text, path);
}

absl::StatusOr<v1::DaemonConfig> LoadConfigString(std::string_view yaml,
                                                  std::string_view source_name) {
  Diagnostics diag{std::string(source_name)};
  YAML::Node root;
  std::optional<std::optional<YAML::Mark>> second_document;  // where it starts, if known
  try {
    // Not YAML::LoadAll: Debian's yaml-cpp 0.7 loops for ever, allocating all the while,
    // on some malformed input such as `"x",y` (jbeder/yaml-cpp#1040, fixed upstream by
    // #1319). The first document, then one more parser step to see whether a second
    // document follows, are bounded.
    root = YAML::Load(std::string(yaml));
    std::istringstream in{std::string(yaml)};
    YAML::Parser parser(in);
    DocumentStarts starts;
    parser.HandleNextDocument(starts);
    if (parser.HandleNextDocument(starts)) second_document = starts.last();
  } catch (const YAML::Exception& e) {
    // yaml-cpp's messages name the syntax problem, never the document's content, but
    // some end with the offending character as is ("unknown escape character: " and a
    // raw line break or control byte): escaped, so an error stays one printable line.
    std::string msg;
    for (unsigned char c : e.msg) {
      if (c < 0x20 || c == 0x7f) {
        absl::StrAppend(&msg, "\\x", absl::Hex(c, absl::kZeroPad2));
      } else {
        msg.push_back(static_cast<char>(c));
      }
    }
    std::optional<YAML::Mark> mark;
    if (!e.mark.is_null()) mark = e.mark;
    diag.Add(mark, "", absl::StrCat("invalid YAML: ", msg, " (fix the syntax here)"));
    return diag.ToStatus();
  }
  if (second_document.has_value()) {
    const bool marker = yaml.substr(0, 3) == "---" || yaml.find("\n---") != std::string_view::npos;
    diag.Add(*second_document, "",
             marker ? "a config file holds one YAML document (remove the \"---\" and what follows)"
                    : "unexpected content after the end of the document (fix the syntax here)");
    return diag.ToStatus();
  }
  if (!root.IsDefined() || root.IsNull()) {
    diag.Add(std::nullopt, "",
             "the config is empty (it needs at least a \"server:\" section with listen or "
             "unix_socket)");
    return diag.ToStatus();
  }
  v1::DaemonConfig config;
  SourceMap sources;
  ParseYamlInto(root, &config, "", diag, &sources);
  // Cross-field checks on a half-parsed config would mostly repeat the errors above.
  if (!diag.empty()) return diag.ToStatus();
  if (absl::Status s = ApplyDefaults(&config); !s.ok()) return s;
  Validator(sources, diag).Run(config);
  if (!diag.empty()) return diag.ToStatus();
  return config;
}

absl::Status ParseYamlInto(const YAML::Node& node, google::protobuf::Message* message,
                           std::string_view source_name, const std::string& path) {
  Diagnostics diag{std::string(source_name)};
  ParseYamlInto(node, message, path, diag, nullptr);
  return diag.ToStatus();
}

absl::Status ApplyConfigDefaults(google::protobuf::Message* message) {
  return ApplyDefaults(message);
}

}  // namespace wsbridge::config
