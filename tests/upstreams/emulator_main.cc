// wsbridge-emulator: local stand-ins for the upstream WebSocket APIs wsbridge bridges,
// for tests and the demo. Loopback only.
//
//   wsbridge-emulator --dfx 127.0.0.1:0 [--dfx-token TOKEN ...] [--tls-cert F --tls-key F]
//
// Prints one JSON line per listener on stdout once all listen, e.g.
//   {"api":"dfx","url":"ws://127.0.0.1:40123"}
// and runs until SIGTERM or SIGINT (exit 0). Errors go to stderr with exit 2 (usage)
// or 1 (start-up failure).
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include "absl/status/status.h"
#include "tests/upstreams/dfx_emulator.h"

namespace {

constexpr std::string_view kUsage =
    "usage: wsbridge-emulator [--dfx HOST:PORT]... [--dfx-token TOKEN]...\n"
    "                         [--tls-cert FILE --tls-key FILE]\n"
    "  --dfx HOST:PORT     serve the DFX (DeepAffex) WebSocket API here (loopback only;\n"
    "                      port 0 picks a free one); repeatable\n"
    "  --dfx-token TOKEN   accept this device token (repeatable); without any, every\n"
    "                      non-empty token not starting with \"bad\" is accepted\n"
    "  --tls-cert/--tls-key  PEM files: serve wss:// instead of ws://\n";

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

struct Flags {
  std::vector<std::string> dfx;
  std::vector<std::string> dfx_tokens;
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
    } else if (name == "--tls-cert") {
      flags.tls_cert = value;
    } else if (name == "--tls-key") {
      flags.tls_key = value;
    } else {
      return Usage("unknown argument " + std::string(arg));
    }
  }
  if (flags.dfx.empty()) return Usage("nothing to serve: give at least one --dfx HOST:PORT");
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
