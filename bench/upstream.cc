#include "bench/upstream.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::bench {
namespace {

using upstreams::WsServerConnection;
using ConnPtr = std::shared_ptr<WsServerConnection>;

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// First `"key":"value"` string in a JSON body (keys the bench upstream needs are flat
// and unique enough; this is a load generator, not a validator).
std::string StringField(std::string_view body, const std::string& key) {
  std::string pat = absl::StrCat("\"", key, "\":\"");
  size_t at = body.find(pat);
  if (at == std::string_view::npos) return "";
  at += pat.size();
  size_t end = body.find('"', at);
  return end == std::string_view::npos ? "" : std::string(body.substr(at, end - at));
}

int64_t IntField(std::string_view body, const std::string& key) {
  std::string pat = absl::StrCat("\"", key, "\":");
  size_t at = body.find(pat);
  if (at == std::string_view::npos) return 0;
  at += pat.size();
  size_t end = at;
  while (end < body.size() && (isdigit(static_cast<unsigned char>(body[end])) || body[end] == '-')) {
    ++end;
  }
  int64_t v = 0;
  (void)absl::SimpleAtoi(std::string(body.substr(at, end - at)), &v);
  return v;
}

struct Subscription {
  std::weak_ptr<WsServerConnection> conn;
  uint64_t conn_id;
  std::string request_id;
};

class Upstream {
 public:
  void OnOpen(const ConnPtr& c) {
    std::lock_guard<std::mutex> lock(mu_);
    conns_[c->id()] = c;
  }

  void OnClose(const ConnPtr& c) {
    std::lock_guard<std::mutex> lock(mu_);
    conns_.erase(c->id());
    chunk_order_.erase(c->id());
    for (auto& [mid, subs] : subs_) {
      std::erase_if(subs, [&](const Subscription& s) { return s.conn_id == c->id(); });
    }
  }

  void OnMessage(const ConnPtr& c, std::string_view data) {
    if (data.size() < 14) {
      c->Close(1002, "short frame");
      return;
    }
    std::string_view action = data.substr(0, 4);
    std::string rid(data.substr(4, 10));
    std::string_view body = data.substr(14);
    if (action == "0718") {
      logins_.fetch_add(1, std::memory_order_relaxed);
      c->Send(rid + "200{}", true);
    } else if (action == "0506") {
      int64_t order;
      {
        std::lock_guard<std::mutex> lock(mu_);
        int64_t& next = chunk_order_[c->id()];
        if (body.find("\"FIRST") != std::string_view::npos) next = 0;
        order = next++;
      }
      c->Send(absl::StrCat(rid, "200{\"ID\":\"d", order, "\",\"ChunkOrder\":", order, "}"), true);
    } else if (action == "0504") {
      c->Send(absl::StrCat(rid, "200{\"ID\":\"bench-m", next_mid_.fetch_add(1), "\"}"), true);
    } else if (action == "0510") {
      std::string mid = StringField(body, "ID");
      {
        std::lock_guard<std::mutex> lock(mu_);
        subs_[mid].push_back({c, c->id(), rid});
      }
      c->Send(rid + "200{}", true);
    } else if (action == "9001") {
      Publish(c, rid, body);
    } else if (action == "9002") {
      std::vector<ConnPtr> others;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, conn] : conns_) {
          if (id != c->id()) others.push_back(conn);
        }
      }
      for (auto& o : others) o->Drop();
      c->Send(absl::StrCat(rid, "200{\"dropped\":", others.size(), "}"), true);
    } else if (action == "9003") {
      size_t conns, subs = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        conns = conns_.size();
        for (auto& [mid, s] : subs_) subs += s.size();
      }
      c->Send(absl::StrCat(rid, "200{\"conns\":", conns, ",\"logins\":", logins_.load(),
                           ",\"subs\":", subs, "}"),
              true);
    } else {
      // The round-trip probe: answer with the request's own body.
      std::string out;
      out.reserve(13 + body.size());
      out.append(rid).append("200").append(body);
      c->Send(std::move(out), true);
    }
  }

  void Stop() {
    stop_ = true;
    if (publisher_.joinable()) publisher_.join();
  }

 private:
  void Publish(const ConnPtr& c, const std::string& rid, std::string_view body) {
    std::string mid = StringField(body, "mid");
    int64_t n = IntField(body, "n"), rate = IntField(body, "rate"), pad = IntField(body, "pad"),
            tag = IntField(body, "tag");
    std::vector<Subscription> targets;
    {
      std::lock_guard<std::mutex> lock(mu_);
      targets = subs_[mid];
    }
    c->Send(absl::StrCat(rid, "200{\"subs\":", targets.size(), "}"), true);
    if (publisher_.joinable()) publisher_.join();
    publisher_ = std::thread([this, mid, n, rate, pad, tag, targets = std::move(targets)] {
      std::string padding(static_cast<size_t>(std::max<int64_t>(pad, 0)), 'x');
      std::vector<ConnPtr> conns;
      for (const auto& t : targets) conns.push_back(t.conn.lock());
      auto start = Clock::now();
      int64_t sent = 0;
      while (sent < n && !stop_) {
        double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
        int64_t due = std::min<int64_t>(n, static_cast<int64_t>(elapsed * static_cast<double>(rate)) + 1);
        for (; sent < due; ++sent) {
          for (size_t i = 0; i < targets.size(); ++i) {
            if (!conns[i]) continue;
            conns[i]->Send(absl::StrCat(targets[i].request_id, "200{\"ID\":\"", mid,
                                        "\",\"ChunkOrder\":", sent, ",\"Results\":{\"tag\":", tag,
                                        ",\"t\":", NowNs(), ",\"pad\":\"", padding, "\"}}"),
                           true);
          }
        }
        if (sent < n) std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
  }

  std::mutex mu_;
  std::map<uint64_t, ConnPtr> conns_;
  std::map<uint64_t, int64_t> chunk_order_;
  std::map<std::string, std::vector<Subscription>> subs_;
  std::atomic<int64_t> logins_{0}, next_mid_{0};
  std::atomic<bool> stop_{false};
  std::thread publisher_;
};

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

}  // namespace

int RunUpstream(const std::vector<std::string>& args) {
  upstreams::WsServerOptions opt;
  // The fan-out publisher sends far faster than one socket write per frame allows.
  opt.coalesce_writes = true;
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "--listen") opt.listen = args[i + 1];
    if (args[i] == "--tls-cert") opt.cert_pem = ReadFile(args[i + 1]), opt.tls = true;
    if (args[i] == "--tls-key") opt.key_pem = ReadFile(args[i + 1]);
    if (args[i] == "--threads") opt.threads = std::stoi(args[i + 1]);
  }
  RaiseFdLimit();
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  signal(SIGPIPE, SIG_IGN);
  auto up = std::make_shared<Upstream>();
  upstreams::WsServerHandler h;
  h.on_handshake = [](const upstreams::HandshakeInfo& info, std::string* sub) {
    for (const auto& p : info.requested_subprotocols) {
      if (p == "json") *sub = "json";
    }
    return absl::OkStatus();
  };
  h.on_open = [up](const ConnPtr& c) { up->OnOpen(c); };
  h.on_close = [up](const ConnPtr& c, const absl::Status&) { up->OnClose(c); };
  h.on_message = [up](const ConnPtr& c, std::string_view d, bool) { up->OnMessage(c, d); };
  upstreams::WsServer server(opt, h);
  if (auto st = server.Start(); !st.ok()) {
    fprintf(stderr, "upstream: %s\n", st.ToString().c_str());
    return 1;
  }
  printf("{\"event\":\"upstream\",\"url\":\"%s\"}\n", server.url().c_str());
  fflush(stdout);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  up->Stop();
  server.Stop();
  return 0;
}

}  // namespace wsbridge::bench
