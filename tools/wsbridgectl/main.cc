// wsbridgectl: the operator's command line for a running wsbridged. Health, upstream
// sessions, and any method with JSON in and out through server reflection, so that
// nobody needs grpcurl or code to look at the daemon.
//
// Exit codes: 0 OK; 1 the daemon answered with an error (or NOT_SERVING, or could not
// be reached); 2 bad usage or request JSON that does not parse.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>
#include <grpc/support/log.h>
#include <grpcpp/client_context.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tools/wsbridgectl/call.h"
#include "tools/wsbridgectl/options.h"
#include "tools/wsbridgectl/reflection_db.h"
#include "tools/wsbridgectl/status_print.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"

namespace wsbridge::ctl {
namespace {

namespace pb = google::protobuf;
using wsbridge::admin::v1::AdminService;

constexpr std::string_view kGlobalHelp =
    "usage: wsbridgectl [global flags] <command> [args]\n"
    "\n"
    "Talks to a running wsbridged over gRPC.\n"
    "\n"
    "commands:\n"
    "  health [SERVICE]          health check; prints SERVING or NOT_SERVING\n"
    "  sessions [--bridge NAME]  upstream sessions, one line each (--json: as JSON)\n"
    "  close-session ID          close one upstream session\n"
    "  list [SERVICE]            services, or one service's methods (server reflection)\n"
    "  describe SYMBOL           a service, method, message or enum as proto text\n"
    "  call METHOD [JSON]        call any method with JSON in and out\n"
    "  help [COMMAND]            this text, or one command's\n"
    "\n"
    "global flags (before or after the command):\n"
    "  --target ADDR      host:port or unix:/path (default $WSBRIDGE_TARGET, else\n"
    "                     127.0.0.1:50051)\n"
    "  --token TOKEN      bearer token, sent as `authorization: Bearer TOKEN`\n"
    "                     (default $WSBRIDGE_TOKEN)\n"
    "  --tls              TLS to the daemon (system roots unless --ca)\n"
    "  --ca FILE          PEM roots that verify the daemon (implies --tls)\n"
    "  --cert FILE --key FILE  client certificate and key for mTLS (imply --tls)\n"
    "  --server-name NAME the name the daemon's certificate must carry (default: the\n"
    "                     target's host; implies --tls)\n"
    "  --timeout SECONDS  per-call deadline (default 10; streams: none unless given)\n"
    "  -H KEY=VALUE       extra request metadata, repeatable\n"
    "                     (e.g. -H x-dfx-device-token=...)\n"
    "  -v, --verbose      print response headers and trailers on stderr\n"
    "  --emit-defaults    print response fields that hold their default value\n"
    "  -h, --help         help (after a command: that command's help)\n"
    "\n"
    "exit codes: 0 OK; 1 error status, NOT_SERVING or no connection; 2 bad usage or\n"
    "request JSON that does not parse.\n";

const std::map<std::string, std::string, std::less<>>& CommandHelp() {
  static const auto* help = new std::map<std::string, std::string, std::less<>>{
      {"health",
       "usage: wsbridgectl health [SERVICE]\n"
       "\n"
       "grpc.health.v1.Health/Check for the whole daemon (no SERVICE) or one service,\n"
       "e.g. wsbridge.dfx.v1.DfxService (a bridge's service is SERVING while its upstream\n"
       "is usable). Prints SERVING or NOT_SERVING; exits 0 only if SERVING. A service the\n"
       "daemon does not know: NOT_FOUND, exit 1.\n"
       "\n"
       "  wsbridgectl health\n"
       "  wsbridgectl health wsbridge.dfx.v1.DfxService\n"},
      {"sessions",
       "usage: wsbridgectl sessions [--bridge NAME] [--json]\n"
       "\n"
       "wsbridge.admin.v1.AdminService/ListSessions: every upstream session, one line\n"
       "each: ID BRIDGE STATE UP (time since it became ready) RECONNECTS IN_FLIGHT SUBS\n"
       "FRAMES_IN FRAMES_OUT BYTES_IN BYTES_OUT TARGET LAST_ERROR.\n"
       "\n"
       "  --bridge NAME  only this bridge instance's sessions (unknown name: NOT_FOUND)\n"
       "  --json         the ListSessionsResponse as one JSON object, every field included\n"
       "\n"
       "  wsbridgectl sessions\n"
       "  wsbridgectl sessions --bridge dfx --json\n"},
      {"close-session",
       "usage: wsbridgectl close-session ID\n"
       "\n"
       "wsbridge.admin.v1.AdminService/CloseSession: closes one upstream session (close\n"
       "code 1001). Its callers get UNAVAILABLE; a shared session is re-created by the next\n"
       "call that needs it. ID as `sessions` prints it (\"<bridge>/<session>\"); an unknown\n"
       "id is NOT_FOUND, exit 1.\n"
       "\n"
       "  wsbridgectl close-session dfx/3f9a1c2e\n"},
      {"list",
       "usage: wsbridgectl list [SERVICE]\n"
       "\n"
       "Through server reflection: the services the daemon serves, or SERVICE's methods\n"
       "as pkg.Service/Method (the form `call` takes), one per line.\n"
       "\n"
       "  wsbridgectl list\n"
       "  wsbridgectl list wsbridge.dfx.v1.DfxService\n"},
      {"describe",
       "usage: wsbridgectl describe SYMBOL\n"
       "\n"
       "Through server reflection: a service, method (pkg.Service/Method or\n"
       "pkg.Service.Method; printed with its request and response messages), message or\n"
       "enum, as proto text.\n"
       "\n"
       "  wsbridgectl describe wsbridge.dfx.v1.DfxService\n"
       "  wsbridgectl describe wsbridge.dfx.v1.DfxService/CreateMeasurement\n"
       "  wsbridgectl describe wsbridge.dfx.v1.MeasurementChunk\n"},
      {"call",
       "usage: wsbridgectl call METHOD [JSON]\n"
       "\n"
       "Calls METHOD (pkg.Service/Method or pkg.Service.Method), its types taken from\n"
       "server reflection. The request is the JSON argument, or stdin when JSON is absent\n"
       "or \"-\" (empty input = the empty request). Client and bidi streams send one\n"
       "request per JSON object (one per line) as stdin delivers it; stdin EOF half-closes\n"
       "the stream, and the call ends when the server ends it. A JSON argument to a\n"
       "client or bidi stream may hold several objects. Field names: the proto names or\n"
       "their lowerCamelCase JSON names; bytes fields are base64; enums by name; 64-bit\n"
       "integers may be strings. Responses print as JSON, one per line, as they arrive,\n"
       "with the proto field names (--emit-defaults: default values too).\n"
       "\n"
       "A non-OK status prints to stderr as \"CODE: message\" plus the google.rpc.ErrorInfo\n"
       "reason, domain and metadata when the server sent them; exit 1. JSON that does not\n"
       "parse as the request type, or names an unknown field: the error, exit 2.\n"
       "\n"
       "  wsbridgectl call wsbridge.dfx.v1.DfxService/CreateMeasurement '{\"study_id\":\"demo\"}'\n"
       "  wsbridgectl call wsbridge.dfx.v1.DfxService/SubscribeResults '{\"measurement_id\":\"M\"}'\n"
       "  wsbridgectl call wsbridge.dfx.v1.DfxService/StreamMeasurement < chunks.jsonl\n"},
      {"help",
       "usage: wsbridgectl help [COMMAND]\n"
       "\n"
       "Prints the overview, or COMMAND's help (same as `wsbridgectl COMMAND --help`).\n"},
  };
  return *help;
}

int UsageError(const std::string& message, const std::string& command = {}) {
  std::cerr << "wsbridgectl: " << message << "\n";
  std::cerr << (command.empty() ? "run `wsbridgectl --help` for usage"
                                : absl::StrCat("run `wsbridgectl ", command, " --help` for usage"))
            << "\n";
  return kExitUsage;
}

int Failed(const grpc::Status& status) {
  PrintStatus(status, std::cerr);
  return kExitFailed;
}

// The arguments after global flags are taken out.
struct CommandLine {
  GlobalOptions options;
  std::string command;
  std::vector<std::string> args;
  bool help = false;
};

// Parses the global flags wherever they stand; everything else is the command and
// its arguments. Returns an error message for bad usage.
std::optional<std::string> Parse(int argc, char** argv, CommandLine& line) {
  GlobalOptions& o = line.options;
  if (const char* target = std::getenv("WSBRIDGE_TARGET"); target != nullptr && *target) {
    o.target = target;
  } else {
    o.target = "127.0.0.1:50051";
  }
  if (const char* token = std::getenv("WSBRIDGE_TOKEN"); token != nullptr) o.token = token;
  bool only_args = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto take_command_arg = [&] {
      if (line.command.empty()) {
        line.command = arg;
      } else {
        line.args.push_back(arg);
      }
    };
    if (only_args || arg == "-" || arg.size() < 2 || arg[0] != '-') {
      take_command_arg();
      continue;
    }
    if (arg == "--") {
      only_args = true;
      continue;
    }
    // "--flag=value" and "--flag value" both work.
    std::string name = arg;
    std::optional<std::string> inline_value;
    if (size_t eq = arg.find('='); absl::StartsWith(arg, "--") && eq != std::string::npos) {
      name = arg.substr(0, eq);
      inline_value = arg.substr(eq + 1);
    }
    auto value = [&]() -> std::optional<std::string> {
      if (inline_value) return inline_value;
      if (i + 1 >= argc) return std::nullopt;
      return std::string(argv[++i]);
    };
    auto needs = [&](const std::string& flag) {
      return absl::StrCat(flag, " needs a value");
    };
    if (name == "-h" || name == "--help") {
      line.help = true;
    } else if (name == "-v" || name == "--verbose") {
      o.verbose = true;
    } else if (name == "--emit-defaults") {
      o.emit_defaults = true;
    } else if (name == "--tls") {
      o.tls = true;
    } else if (name == "--target") {
      auto v = value();
      if (!v || v->empty()) return needs("--target ADDR");
      o.target = *v;
    } else if (name == "--token") {
      auto v = value();
      if (!v) return needs("--token TOKEN");
      o.token = *v;
    } else if (name == "--ca" || name == "--cert" || name == "--key") {
      auto v = value();
      if (!v || v->empty()) return needs(absl::StrCat(name, " FILE"));
      (name == "--ca" ? o.ca_file : name == "--cert" ? o.cert_file : o.key_file) = *v;
      o.tls = true;
    } else if (name == "--server-name") {
      auto v = value();
      if (!v || v->empty()) return needs("--server-name NAME");
      o.server_name = *v;
      o.tls = true;
    } else if (name == "--timeout") {
      auto v = value();
      if (!v) return needs("--timeout SECONDS");
      double seconds = 0;
      if (!absl::SimpleAtod(*v, &seconds) || !(seconds > 0) || seconds > 1e9) {
        return absl::StrCat("--timeout: \"", *v, "\" is not a positive number of seconds");
      }
      o.timeout_seconds = seconds;
    } else if (name == "-H" || name == "--header") {
      auto v = value();
      if (!v) return needs("-H KEY=VALUE");
      size_t eq = v->find('=');
      if (eq == std::string::npos || eq == 0) {
        return absl::StrCat("-H: \"", *v, "\" is not KEY=VALUE");
      }
      // gRPC metadata keys are lower case.
      o.headers.emplace_back(absl::AsciiStrToLower(v->substr(0, eq)), v->substr(eq + 1));
    } else if (!line.command.empty()) {
      // A command's own flag (e.g. sessions --json): the command checks it.
      take_command_arg();
    } else {
      return absl::StrCat("unknown flag ", arg);
    }
  }
  if ((o.cert_file.empty()) != (o.key_file.empty())) {
    return "--cert and --key go together (the client certificate and its private key)";
  }
  return std::nullopt;
}

std::string Age(const pb::Timestamp& since) {
  if (since.seconds() == 0 && since.nanos() == 0) return "-";
  absl::Duration d = absl::Now() - absl::FromUnixSeconds(since.seconds());
  if (d < absl::ZeroDuration()) d = absl::ZeroDuration();
  const int64_t s = absl::ToInt64Seconds(d);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrCat(s / 60, "m", s % 60, "s");
  if (s < 86400) return absl::StrCat(s / 3600, "h", (s % 3600) / 60, "m");
  return absl::StrCat(s / 86400, "d", (s % 86400) / 3600, "h");
}

std::string StateName(admin::v1::SessionState state) {
  const std::string name = admin::v1::SessionState_Name(state);
  return absl::AsciiStrToLower(absl::StripPrefix(name, "SESSION_STATE_"));
}

int RunHealth(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  if (line.args.size() > 1) return UsageError("health takes at most one SERVICE", "health");
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  PrepareContext(line.options, false, context);
  grpc::health::v1::HealthCheckRequest request;
  if (!line.args.empty()) request.set_service(line.args[0]);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return Failed(status);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
            << std::endl;
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk
                                                                              : kExitFailed;
}

int RunSessions(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  admin::v1::ListSessionsRequest request;
  bool json = false;
  for (size_t i = 0; i < line.args.size(); ++i) {
    const std::string& arg = line.args[i];
    if (arg == "--json") {
      json = true;
    } else if (arg == "--bridge" && i + 1 < line.args.size()) {
      request.set_bridge(line.args[++i]);
    } else if (absl::StartsWith(arg, "--bridge=")) {
      request.set_bridge(arg.substr(9));
    } else if (arg == "--bridge") {
      return UsageError("--bridge needs a bridge name", "sessions");
    } else {
      return UsageError(absl::StrCat("sessions: unexpected argument \"", arg, "\""), "sessions");
    }
  }
  auto stub = AdminService::NewStub(channel);
  grpc::ClientContext context;
  PrepareContext(line.options, false, context);
  admin::v1::ListSessionsResponse response;
  grpc::Status status = stub->ListSessions(&context, request, &response);
  if (!status.ok()) return Failed(status);
  if (json) {
    pb::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    options.always_print_primitive_fields = true;
    std::string out;
    (void)pb::util::MessageToJsonString(response, &out, options);
    std::cout << out << std::endl;
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows = {
      {"ID", "BRIDGE", "STATE", "UP", "RECONNECTS", "IN_FLIGHT", "SUBS", "FRAMES_IN",
       "FRAMES_OUT", "BYTES_IN", "BYTES_OUT", "TARGET", "LAST_ERROR"}};
  for (const auto& s : response.sessions()) {
    rows.push_back({s.id(), s.bridge(), StateName(s.state()), Age(s.connected_since()),
                    absl::StrCat(s.reconnects()), absl::StrCat(s.in_flight_requests()),
                    absl::StrCat(s.subscribers()), absl::StrCat(s.frames_in()),
                    absl::StrCat(s.frames_out()), absl::StrCat(s.bytes_in()),
                    absl::StrCat(s.bytes_out()), s.target(),
                    s.last_error().empty() ? "-" : s.last_error()});
  }
  std::vector<size_t> width(rows.front().size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  for (const auto& row : rows) {
    std::string out;
    for (size_t c = 0; c < row.size(); ++c) {
      out += row[c];
      // The last column (free text) is not padded.
      if (c + 1 < row.size()) out += std::string(width[c] - row[c].size() + 2, ' ');
    }
    std::cout << out << "\n";
  }
  if (response.sessions_size() == 0) std::cerr << "(no upstream sessions)\n";
  std::cout.flush();
  return kExitOk;
}

int RunCloseSession(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  if (line.args.size() != 1 || line.args[0].empty() || line.args[0][0] == '-') {
    return UsageError("close-session takes one session ID (see `wsbridgectl sessions`)",
                      "close-session");
  }
  auto stub = AdminService::NewStub(channel);
  grpc::ClientContext context;
  PrepareContext(line.options, false, context);
  admin::v1::CloseSessionRequest request;
  request.set_id(line.args[0]);
  admin::v1::CloseSessionResponse response;
  grpc::Status status = stub->CloseSession(&context, request, &response);
  if (!status.ok()) return Failed(status);
  std::cout << "closed " << line.args[0] << std::endl;
  return kExitOk;
}

// A symbol the pool did not find: the reflection stream's own failure (no daemon,
// UNAUTHENTICATED, ...) if there was one, else NOT_FOUND naming the services there are.
int NotFound(ReflectionDatabase& db, const std::string& what) {
  if (!db.transport_error().ok()) return Failed(db.transport_error());
  std::string hint;
  if (auto services = db.ListServices(); services.ok()) {
    hint = absl::StrCat("; the server has: ", absl::StrJoin(*services, ", "));
  }
  return Failed(grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat(what, hint)));
}

int RunList(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  if (line.args.size() > 1) return UsageError("list takes at most one SERVICE", "list");
  ReflectionDatabase db(channel, line.options);
  if (line.args.empty()) {
    auto services = db.ListServices();
    if (!services.ok()) {
      return Failed(grpc::Status(static_cast<grpc::StatusCode>(services.status().code()),
                                 std::string(services.status().message())));
    }
    for (const auto& name : *services) std::cout << name << "\n";
    std::cout.flush();
    return kExitOk;
  }
  pb::DescriptorPool pool(&db);
  const std::string name(absl::StripPrefix(line.args[0], "."));
  const pb::ServiceDescriptor* service = pool.FindServiceByName(name);
  if (service == nullptr) return NotFound(db, absl::StrCat("no service \"", name, "\""));
  for (int i = 0; i < service->method_count(); ++i) {
    std::cout << service->full_name() << "/" << service->method(i)->name() << "\n";
  }
  std::cout.flush();
  return kExitOk;
}

int RunDescribe(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  if (line.args.size() != 1) return UsageError("describe takes one SYMBOL", "describe");
  ReflectionDatabase db(channel, line.options);
  pb::DescriptorPool pool(&db);
  Symbol symbol = FindSymbol(pool, line.args[0]);
  if (!symbol.found()) {
    return NotFound(db, absl::StrCat("no service, method, message or enum \"", line.args[0], "\""));
  }
  if (symbol.service != nullptr) {
    std::cout << "// " << symbol.service->file()->name() << "\n" << symbol.service->DebugString();
  } else if (symbol.method != nullptr) {
    // The request and response types are what a caller of `call` needs next.
    std::cout << "// " << symbol.method->service()->full_name() << " ("
              << symbol.method->file()->name() << ")\n"
              << symbol.method->DebugString() << "\n"
              << "// request\n"
              << symbol.method->input_type()->DebugString() << "\n"
              << "// response\n"
              << symbol.method->output_type()->DebugString();
  } else if (symbol.message != nullptr) {
    std::cout << "// " << symbol.message->file()->name() << "\n" << symbol.message->DebugString();
  } else {
    std::cout << "// " << symbol.enum_type->file()->name() << "\n"
              << symbol.enum_type->DebugString();
  }
  std::cout.flush();
  return kExitOk;
}

int RunCallCommand(const CommandLine& line, const std::shared_ptr<grpc::Channel>& channel) {
  if (line.args.empty() || line.args.size() > 2) {
    return UsageError("call takes METHOD and an optional JSON request", "call");
  }
  ReflectionDatabase db(channel, line.options);
  pb::DescriptorPool pool(&db);
  Symbol symbol = FindSymbol(pool, line.args[0]);
  if (symbol.method == nullptr) {
    if (symbol.service != nullptr) {
      return UsageError(absl::StrCat("\"", line.args[0],
                                     "\" is a service; name a method: pkg.Service/Method "
                                     "(see `wsbridgectl list ", line.args[0], "`)"),
                        "call");
    }
    if (symbol.found()) {
      return UsageError(absl::StrCat("\"", line.args[0], "\" is not a method"), "call");
    }
    return NotFound(db, absl::StrCat("no method \"", line.args[0], "\""));
  }
  std::optional<std::string> json;
  if (line.args.size() == 2) json = line.args[1];
  // Everything the call needs is in the pool now (a file is built with all it imports).
  db.Close();
  return RunCall(line.options, channel, *symbol.method, json);
}

int Main(int argc, char** argv) {
  CommandLine line;
  if (auto error = Parse(argc, argv, line)) return UsageError(*error, line.command);
  if (line.command.empty()) {
    if (line.help) {
      std::cout << kGlobalHelp;
      return kExitOk;
    }
    std::cerr << kGlobalHelp;
    return kExitUsage;
  }
  if (line.command == "help") {
    if (line.help && line.args.empty()) {
      std::cout << CommandHelp().at("help");
      return kExitOk;
    }
    if (line.args.empty()) {
      std::cout << kGlobalHelp;
      return kExitOk;
    }
    auto it = CommandHelp().find(line.args[0]);
    if (it == CommandHelp().end()) return UsageError(absl::StrCat("no command \"", line.args[0], "\""));
    std::cout << it->second;
    return kExitOk;
  }
  auto help = CommandHelp().find(line.command);
  if (help == CommandHelp().end()) {
    return UsageError(absl::StrCat("unknown command \"", line.command,
                                   "\"; commands: health, sessions, close-session, list, "
                                   "describe, call, help"));
  }
  if (line.help) {
    std::cout << help->second;
    return kExitOk;
  }
  // gRPC's own log lines (handshake failures and the like) repeat what the status
  // printed at the end says; -v keeps them.
  if (!line.options.verbose) gpr_set_log_function([](gpr_log_func_args*) {});
  auto channel = MakeChannel(line.options);
  if (!channel.ok()) return UsageError(std::string(channel.status().message()));
  const std::string& c = line.command;
  if (c == "health") return RunHealth(line, *channel);
  if (c == "sessions") return RunSessions(line, *channel);
  if (c == "close-session") return RunCloseSession(line, *channel);
  if (c == "list") return RunList(line, *channel);
  if (c == "describe") return RunDescribe(line, *channel);
  return RunCallCommand(line, *channel);
}

}  // namespace
}  // namespace wsbridge::ctl

int main(int argc, char** argv) { return wsbridge::ctl::Main(argc, argv); }
