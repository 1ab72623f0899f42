// wsbridge-emulator: local stand-ins for the upstream WebSocket APIs wsbridge bridges,
// for tests and the demo. Loopback only.
//
//   wsbridge-emulator --dfx 127.0.0.1:0 [--dfx-token TOKEN ...] [--tls-cert F --tls-key F]
//   wsbridge-emulator --emogg 127.0.0.1:0 [--emogg-token TOKEN ...] [--emogg-event-interval MS]
//   wsbridge-emulator --nexora 127.0.0.1:0 [--nexora-api-key KEY ...]
//                     [--nexora-user EMAIL:PASSWORD ...]
//   wsbridge-emulator --nlx 127.0.0.1:0 [--nlx-api-key K] [--nlx-deployment-key K]
//                     [--nlx-channel-key K]
//
// Prints one JSON line per listener on stdout once all listen, e.g.
//   {"api":"dfx","url":"ws://127.0.0.1:40123"}
// and runs until SIGTERM or SIGINT (exit 0). Errors go to stderr with exit 2 (usage)
// or 1 (start-up failure).
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include "absl/status/status.h"
#include "tests/upstreams/dfx_emulator.h"
#include "tests/upstreams/emogg_emulator.h"
#include "tests/upstreams/nexora_emulator.h"
#include "tests/upstreams/nlx_emulator.h"

namespace {

constexpr std::string_view kUsage =
    "usage: wsbridge-emulator [--dfx HOST:PORT]... [--dfx-token TOKEN]...\n"
    "                         [--nexora HOST:PORT]... [--nexora-api-key KEY]...\n"
    "                         [--nexora-user EMAIL:PASSWORD]... [--nexora-jwt-lifetime S]\n"
    "                         [--nlx HOST:PORT]... [--nlx-api-key KEY]\n"
    "                         [--nlx-deployment-key KEY] [--nlx-channel-key KEY]\n"
    "                         [--tls-cert FILE --tls-key FILE]\n"
    "  --dfx HOST:PORT     serve the DFX (DeepAffex) WebSocket API here (loopback only;\n"
    "                      port 0 picks a free one); repeatable\n"
    "  --dfx-token TOKEN   accept this device token (repeatable); without any, every\n"
    "                      non-empty token not starting with \"bad\" is accepted\n"
    "  --nexora HOST:PORT  serve the Nexora agent-chat API here: /api/ws/{chat_id} plus\n"
    "                      POST /api/auth/login and POST /api/chats on the same port\n"
    "  --nexora-api-key KEY  accept this API key (repeatable); without any, every key\n"
    "                      starting \"nxr_\" but not \"nxr_bad\" is accepted\n"
    "  --nexora-user EMAIL:PASSWORD  an account for the login endpoint (repeatable)\n"
    "  --nexora-jwt-lifetime SECONDS  lifetime of the JWTs the login issues (default 900)\n"
    "  --emogg HOST:PORT   serve the Emogg WebSocket API here (path /ws/v1); repeatable\n"
    "  --emogg-token TOKEN accept this Emogg token (repeatable); without any, every\n"
    "                      non-empty token not starting with \"bad\" is accepted\n"
    "  --emogg-event-interval MS  channel events every MS ms instead of the key's\n"
    "                      frequency (demos)\n"
    "  --emogg-idle-timeout MS    close connections silent for MS ms (default 65000)\n"
    "  --emogg-max-messages N     messages per user per 60 s before 429 (default 80)\n"
    "  --nlx HOST:PORT     serve the NLX WebSocket API here (keys in the query); repeatable\n"
    "  --nlx-api-key KEY   the accepted apiKey (default nlx-emulator-api-key)\n"
    "  --nlx-deployment-key KEY  the accepted deploymentKey (default nlx-emulator-deployment)\n"
    "  --nlx-channel-key KEY     the accepted channelKey, language suffix included\n"
    "                      (default nlx-emulator-channel-en-US)\n"
    "  --tls-cert/--tls-key  PEM files: serve wss:// (and https://) instead of ws://\n";

// One API served on one address. Other APIs add their own kind here.
class Listener {
 public:
  virtual ~Listener() = default;
  virtual std::string api() const = 0;
  virtual absl::Status Start() = 0;
  virtual std::string url() const = 0;
  virtual void Stop() = 0;
};

class DfxListener : public Listener {
 public:
  explicit DfxListener(wsbridge::emulator::DfxEmulatorOptions o) : emulator_(std::move(o)) {}
  std::string api() const override { return "dfx"; }
  absl::Status Start() override { return emulator_.Start(); }
  std::string url() const override { return emulator_.url(); }
  void Stop() override { emulator_.Stop(); }

 private:
  wsbridge::emulator::DfxEmulator emulator_;
};

// Nexora: the URL printed is the WebSocket root; the HTTP endpoints share its port.
class NexoraListener : public Listener {
 public:
  explicit NexoraListener(wsbridge::emulator::NexoraEmulatorOptions o) : emulator_(std::move(o)) {}
  std::string api() const override { return "nexora"; }
  absl::Status Start() override { return emulator_.Start(); }
  std::string url() const override { return emulator_.url(); }
  void Stop() override { emulator_.Stop(); }

 private:
  wsbridge::emulator::NexoraEmulator emulator_;
};

class EmoggListener : public Listener {
 public:
  explicit EmoggListener(wsbridge::emulator::EmoggEmulatorOptions o) : emulator_(std::move(o)) {}
  std::string api() const override { return "emogg"; }
  absl::Status Start() override { return emulator_.Start(); }
  std::string url() const override { return emulator_.url(); }
  void Stop() override { emulator_.Stop(); }

 private:
  wsbridge::emulator::EmoggEmulator emulator_;
};

// NLX: the URL printed is the socket endpoint; clients add the keys as query parameters.
class NlxListener : public Listener {
 public:
  explicit NlxListener(wsbridge::emulator::NlxEmulatorOptions o) : emulator_(std::move(o)) {}
  std::string api() const override { return "nlx"; }
  absl::Status Start() override { return emulator_.Start(); }
  std::string url() const override { return emulator_.url(); }
  void Stop() override { emulator_.Stop(); }

 private:
  wsbridge::emulator::NlxEmulator emulator_;
};

// A positive integer flag value (ms or a count).
bool ParsePositive(const std::string& value, int* out) {
  if (value.empty() || value.size() > 9 || value.find_first_not_of("0123456789") != std::string::npos) {
    return false;
  }
  *out = std::stoi(value);
  return *out > 0;
}

struct Flags {
  std::vector<std::string> emogg;
  std::vector<std::string> emogg_tokens;
  int emogg_event_interval_ms = 0;
  int emogg_idle_timeout_ms = 0;
  int emogg_max_messages = 0;
  std::vector<std::string> nexora;
  std::vector<std::string> nexora_api_keys;
  std::map<std::string, std::string> nexora_users;
  int nexora_jwt_lifetime_s = 900;
  std::vector<std::string> dfx;
  std::vector<std::string> dfx_tokens;
  std::vector<std::string> nlx;
  wsbridge::emulator::NlxEmulatorOptions nlx_keys;  // only the key fields are used
  std::string tls_cert, tls_key;
};

int Usage(const std::string& error) {
  std::cerr << "wsbridge-emulator: " << error << "\n" << kUsage;
  return 2;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return static_cast<bool>(in) || in.eof();
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    // Accept both "--flag value" and "--flag=value".
    std::string value;
    std::string_view name = arg;
    if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = std::string(arg.substr(eq + 1));
    } else if (arg.starts_with("--")) {
      if (i + 1 >= argc) return Usage(std::string(arg) + " needs a value");
      value = argv[++i];
    }
    if (name == "--dfx") {
      flags.dfx.push_back(value);
    } else if (name == "--dfx-token") {
      if (value.empty()) return Usage("--dfx-token must not be empty");
      flags.dfx_tokens.push_back(value);
    } else if (name == "--nexora") {
      flags.nexora.push_back(value);
    } else if (name == "--nexora-api-key") {
      if (value.empty()) return Usage("--nexora-api-key must not be empty");
      flags.nexora_api_keys.push_back(value);
    } else if (name == "--nexora-user") {
      const size_t colon = value.find(':');
      if (colon == std::string::npos || colon == 0) {
        return Usage("--nexora-user takes EMAIL:PASSWORD");
      }
      flags.nexora_users[value.substr(0, colon)] = value.substr(colon + 1);
    } else if (name == "--nexora-jwt-lifetime") {
      char* end = nullptr;
      const long s = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || s < 1 || s > 86400 * 365) {
        return Usage("--nexora-jwt-lifetime takes whole seconds (1 or more)");
      }
      flags.nexora_jwt_lifetime_s = static_cast<int>(s);
    } else if (name == "--emogg") {
      flags.emogg.push_back(value);
    } else if (name == "--emogg-token") {
      if (value.empty()) return Usage("--emogg-token must not be empty");
      flags.emogg_tokens.push_back(value);
    } else if (name == "--emogg-event-interval") {
      if (!ParsePositive(value, &flags.emogg_event_interval_ms)) {
        return Usage("--emogg-event-interval takes milliseconds, e.g. 1000");
      }
    } else if (name == "--emogg-idle-timeout") {
      if (!ParsePositive(value, &flags.emogg_idle_timeout_ms)) {
        return Usage("--emogg-idle-timeout takes milliseconds, e.g. 65000");
      }
    } else if (name == "--emogg-max-messages") {
      if (!ParsePositive(value, &flags.emogg_max_messages)) {
        return Usage("--emogg-max-messages takes a positive count, e.g. 80");
      }
    } else if (name == "--nlx") {
      flags.nlx.push_back(value);
    } else if (name == "--nlx-api-key" || name == "--nlx-deployment-key" ||
               name == "--nlx-channel-key") {
      if (value.empty()) return Usage(std::string(name) + " must not be empty");
      std::string& key = name == "--nlx-api-key"          ? flags.nlx_keys.api_key
                         : name == "--nlx-deployment-key" ? flags.nlx_keys.deployment_key
                                                          : flags.nlx_keys.channel_key;
      key = value;
    } else if (name == "--tls-cert") {
      flags.tls_cert = value;
    } else if (name == "--tls-key") {
      flags.tls_key = value;
    } else {
      return Usage("unknown argument " + std::string(arg));
    }
  }
  if (flags.dfx.empty() && flags.emogg.empty() && flags.nexora.empty() && flags.nlx.empty()) {
    return Usage("nothing to serve: give at least one --dfx, --emogg, --nexora or --nlx HOST:PORT");
  }
  if (flags.tls_cert.empty() != flags.tls_key.empty()) {
    return Usage("--tls-cert and --tls-key go together");
  }
  std::string cert_pem, key_pem;
  const bool tls = !flags.tls_cert.empty();
  if (tls) {
    if (!ReadFile(flags.tls_cert, &cert_pem)) return Usage("cannot read --tls-cert " + flags.tls_cert);
    if (!ReadFile(flags.tls_key, &key_pem)) return Usage("cannot read --tls-key " + flags.tls_key);
  }

  // Block the stop signals before any thread starts so only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  std::vector<std::unique_ptr<Listener>> listeners;
  for (const std::string& listen : flags.dfx) {
    wsbridge::emulator::DfxEmulatorOptions o;
    o.listen = listen;
    o.tokens = flags.dfx_tokens;
    o.tls = tls;
    o.cert_pem = cert_pem;
    o.key_pem = key_pem;
    listeners.push_back(std::make_unique<DfxListener>(std::move(o)));
  }
  for (const std::string& listen : flags.emogg) {
    wsbridge::emulator::EmoggEmulatorOptions o;
    o.listen = listen;
    o.tls = tls;
    o.cert_pem = cert_pem;
    o.key_pem = key_pem;
    o.protocol.tokens = flags.emogg_tokens;
    o.protocol.id_seed = 0;  // drawn at random
    if (flags.emogg_event_interval_ms > 0) {
      o.protocol.event_interval = std::chrono::milliseconds(flags.emogg_event_interval_ms);
    }
    if (flags.emogg_idle_timeout_ms > 0) {
      o.protocol.idle_timeout = std::chrono::milliseconds(flags.emogg_idle_timeout_ms);
    }
    if (flags.emogg_max_messages > 0) o.protocol.max_messages = flags.emogg_max_messages;
    listeners.push_back(std::make_unique<EmoggListener>(std::move(o)));
  }
  for (const std::string& listen : flags.nexora) {
    wsbridge::emulator::NexoraEmulatorOptions o;
    o.listen = listen;
    o.api_keys = flags.nexora_api_keys;
    o.users = flags.nexora_users;
    o.jwt_lifetime = std::chrono::seconds(flags.nexora_jwt_lifetime_s);
    o.tls = tls;
    o.cert_pem = cert_pem;
    o.key_pem = key_pem;
    listeners.push_back(std::make_unique<NexoraListener>(std::move(o)));
  }
  for (const std::string& listen : flags.nlx) {
    wsbridge::emulator::NlxEmulatorOptions o = flags.nlx_keys;
    o.listen = listen;
    o.tls = tls;
    o.cert_pem = cert_pem;
    o.key_pem = key_pem;
    listeners.push_back(std::make_unique<NlxListener>(std::move(o)));
  }
  for (auto& l : listeners) {
    if (absl::Status st = l->Start(); !st.ok()) {
      std::cerr << "wsbridge-emulator: cannot start the " << l->api() << " listener: " << st
                << "\n";
      return 1;
    }
  }
  for (auto& l : listeners) {
    boost::json::object line;
    line["api"] = l->api();
    line["url"] = l->url();
    std::cout << boost::json::serialize(line) << "\n";
  }
  std::cout.flush();

  int sig = 0;
  sigwait(&stop_signals, &sig);
  for (auto& l : listeners) l->Stop();
  return 0;
}
