#include "tests/upstreams/dfx_protocol.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <utility>

#include <boost/json.hpp>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;

constexpr size_t kActionLen = 4;
constexpr size_t kRequestIdLen = 10;
constexpr std::string_view kChunkMagic = "WSBE";
constexpr size_t kChunkHeaderLen = 12;

bool AllDigits(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Standard base64 (RFC 4648 §4) with padding required, as Buffer.toString('base64')
// produces. Written here rather than shared so the emulator stays independent.
std::optional<std::string> DecodeBase64(std::string_view in, std::string* why) {
  if (in.size() % 4 != 0) {
    *why = "Payload is not valid base64: length " + std::to_string(in.size()) +
           " is not a multiple of 4";
    return std::nullopt;
  }
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      char c = in[i + k];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      v[k] = value(c);
      if (v[k] < 0 || pad > 0) {
        *why = "Payload is not valid base64: unexpected character at offset " +
               std::to_string(i + k);
        return std::nullopt;
      }
    }
    uint32_t n = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out.push_back(static_cast<char>((n >> 16) & 0xff));
    if (pad < 2) out.push_back(static_cast<char>((n >> 8) & 0xff));
    if (pad < 1) out.push_back(static_cast<char>(n & 0xff));
  }
  return out;
}

uint32_t ReadU32Le(std::string_view s) {
  return static_cast<uint32_t>(static_cast<unsigned char>(s[0])) |
         static_cast<uint32_t>(static_cast<unsigned char>(s[1])) << 8 |
         static_cast<uint32_t>(static_cast<unsigned char>(s[2])) << 16 |
         static_cast<uint32_t>(static_cast<unsigned char>(s[3])) << 24;
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

const json::string* StringField(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  if (it == o.end() || !it->value().is_string()) return nullptr;
  return &it->value().get_string();
}

// Params.ID of 0506 / 0510 bodies; nullptr when absent or not a non-empty string.
const json::string* ParamsId(const json::object& body) {
  auto it = body.find("Params");
  if (it == body.end() || !it->value().is_object()) return nullptr;
  const json::string* id = StringField(it->value().get_object(), "ID");
  return id != nullptr && !id->empty() ? id : nullptr;
}

}  // namespace

std::string MakeEmulatorChunk(uint32_t chunk_order, uint32_t duration_ms, std::string_view body) {
  std::string out(kChunkMagic);
  for (uint32_t v : {chunk_order, duration_ms}) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  out.append(body);
  return out;
}

struct DfxProtocol::Request {
  std::string action;
  std::string request_id;
  json::object body;
};

DfxProtocol::DfxProtocol(DfxProtocolOptions options)
    : options_(std::move(options)), id_state_(options_.id_seed) {}

void DfxProtocol::OnOpen(uint64_t conn) { conns_[conn] = Conn{}; }

void DfxProtocol::OnClose(uint64_t conn) { conns_.erase(conn); }

std::string DfxProtocol::NewId() {
  uint64_t a = SplitMix64(id_state_);
  uint64_t b = SplitMix64(id_state_);
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%08x-%04x-%04x-%04x-%012llx",
                static_cast<unsigned>(a >> 32), static_cast<unsigned>((a >> 16) & 0xffff),
                static_cast<unsigned>(0x4000 | (a & 0x0fff)),
                static_cast<unsigned>(0x8000 | ((b >> 48) & 0x3fff)),
                static_cast<unsigned long long>(b & 0xffffffffffffULL));
  return buf;
}

DfxAction DfxProtocol::Answer(uint64_t conn, std::string_view request_id, int status,
                              std::string_view json_text) const {
  DfxAction a;
  a.conn = conn;
  a.kind = DfxAction::Kind::kSend;
  a.bytes.reserve(kRequestIdLen + 3 + json_text.size());
  a.bytes.append(request_id);
  a.bytes.append(std::to_string(status));
  a.bytes.append(json_text);
  a.delay = answer_delay_;
  return a;
}

DfxAction DfxProtocol::Error(uint64_t conn, std::string_view request_id, int status,
                             std::string_view code, std::string_view message) const {
  json::object o;
  o["Code"] = code;
  o["Message"] = message;
  return Answer(conn, request_id, status, json::serialize(o));
}

bool DfxProtocol::TokenAccepted(const std::string& token) const {
  if (token.empty()) return false;
  if (options_.tokens.empty()) return token.rfind("bad", 0) != 0;
  return std::find(options_.tokens.begin(), options_.tokens.end(), token) !=
         options_.tokens.end();
}

std::vector<DfxAction> DfxProtocol::OnFrame(uint64_t conn, std::string_view frame,
                                            DfxClock::time_point now) {
  auto cit = conns_.find(conn);
  if (cit == conns_.end()) return {};  // not open (already closed): nothing to answer
  Conn& c = cit->second;
  ++c.frames;
  if (frame.size() >= kActionLen && AllDigits(frame.substr(0, kActionLen))) {
    ++frames_by_action_[std::string(frame.substr(0, kActionLen))];
  }
  // Fault switch: the connection dies with this frame unanswered (and unprocessed).
  if (drop_after_frames_ >= 0 && c.frames >= drop_after_frames_) {
    DfxAction drop;
    drop.conn = conn;
    drop.kind = DfxAction::Kind::kDrop;
    return {drop};
  }

  // Without a readable request id there is nobody to address an error to, so the
  // protocol itself is broken: close with 1002 (protocol error).
  if (frame.size() < kActionLen + kRequestIdLen) {
    DfxAction close;
    close.conn = conn;
    close.kind = DfxAction::Kind::kClose;
    close.close_code = 1002;
    close.close_reason = "frame shorter than ACTION(4)+REQUEST_ID(10)";
    return {close};
  }
  Request req;
  req.action = std::string(frame.substr(0, kActionLen));
  req.request_id = std::string(frame.substr(kActionLen, kRequestIdLen));
  if (!AllDigits(req.action)) {
    return {Error(conn, req.request_id, 400, "BAD_REQUEST",
                  "action id must be 4 ASCII digits")};
  }
  std::string_view body = frame.substr(kActionLen + kRequestIdLen);
  boost::system::error_code ec;
  json::value parsed = json::parse(body, ec);
  if (ec || !parsed.is_object()) {
    // An empty body is refused too: the vendor client always sends a JSON object.
    return {Error(conn, req.request_id, 400, "BAD_REQUEST",
                  ec ? "body is not valid JSON: " + ec.message()
                     : std::string("body must be a JSON object"))};
  }
  req.body = std::move(parsed.get_object());
  return Handle(conn, c, req, now);
}

std::vector<DfxAction> DfxProtocol::Handle(uint64_t conn, Conn& c, const Request& req,
                                           DfxClock::time_point now) {
  if (req.action == "0718") return Login(conn, c, req);
  if (!c.token) {
    return {Error(conn, req.request_id, 401, "NOT_AUTHENTICATED", "login with 0718 first")};
  }
  if (req.action == "0504") return CreateMeasurement(conn, c, req);
  if (req.action == "0510") return Subscribe(conn, c, req);
  if (req.action == "0506") return AddData(conn, c, req, now);
  if (req.action == "0100") {
    return {Answer(conn, req.request_id, 200, R"({"Version":"emulator","Status":"OK"})")};
  }
  return {Error(conn, req.request_id, 404, "NOT_FOUND",
                "action " + req.action + " is not served by this emulator")};
}

std::vector<DfxAction> DfxProtocol::Login(uint64_t conn, Conn& c, const Request& req) {
  const json::string* token = StringField(req.body, "Token");
  // Choice: a refused login leaves the socket open and the connection logged out
  // (also when it was logged in before), so the client may retry on it.
  if (token == nullptr || token->empty()) {
    c.token.reset();
    return {Error(conn, req.request_id, 401, "INVALID_TOKEN", "Token is missing or empty")};
  }
  std::string t(token->data(), token->size());
  if (refuse_login_ || !TokenAccepted(t)) {
    c.token.reset();
    // Never echo the token: it is a secret.
    return {Error(conn, req.request_id, 401, "INVALID_TOKEN", "the device token was refused")};
  }
  c.token = std::move(t);
  ++logins_;
  return {Answer(conn, req.request_id, 200, "{}")};
}

std::vector<DfxAction> DfxProtocol::CreateMeasurement(uint64_t conn, Conn& c,
                                                      const Request& req) {
  const json::string* study = StringField(req.body, "StudyID");
  if (study == nullptr || study->empty()) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "StudyID (non-empty string) is required")};
  }
  if (auto it = req.body.find("Resolution"); it != req.body.end() && !it->value().is_number()) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER", "Resolution must be a number")};
  }
  std::string id = NewId();
  measurements_[id] = Measurement{.owner_token = *c.token};
  json::object o;
  o["ID"] = id;
  return {Answer(conn, req.request_id, 200, json::serialize(o))};
}

std::vector<DfxAction> DfxProtocol::Subscribe(uint64_t conn, Conn& c, const Request& req) {
  const json::string* mid = ParamsId(req.body);
  if (mid == nullptr) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "Params.ID (measurement id) is required")};
  }
  // The vendor client copies the frame's request id into the body; results are
  // pushed on the body's RequestID, so it is required.
  const json::string* rid = StringField(req.body, "RequestID");
  if (rid == nullptr || rid->size() != kRequestIdLen) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "RequestID (the 10-character request id of this frame) is required")};
  }
  auto mit = measurements_.find(std::string(*mid));
  if (mit == measurements_.end() || mit->second.owner_token != *c.token) {
    return {Error(conn, req.request_id, 404, "INVALID_MEASUREMENT",
                  "measurement " + std::string(*mid) + " was not found")};
  }
  // Choice: subscribing to a finished measurement succeeds but yields nothing more.
  c.subscriptions.push_back(Subscription{std::string(*mid), std::string(*rid)});
  return {Answer(conn, req.request_id, 200, "{}")};
}

std::vector<DfxAction> DfxProtocol::AddData(uint64_t conn, Conn& c, const Request& req,
                                            DfxClock::time_point now) {
  const json::string* mid_s = ParamsId(req.body);
  if (mid_s == nullptr) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "Params.ID (measurement id) is required")};
  }
  std::string mid(*mid_s);
  const json::string* action_s = StringField(req.body, "Action");
  static constexpr std::array<std::string_view, 6> kActions = {
      "FIRST::PROCESS", "FIRST::IGNORE", "CHUNK::PROCESS",
      "CHUNK::IGNORE",  "LAST::PROCESS", "LAST::IGNORE"};
  if (action_s == nullptr ||
      std::find(kActions.begin(), kActions.end(), std::string_view(*action_s)) ==
          kActions.end()) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "Action must be one of FIRST|CHUNK|LAST followed by ::PROCESS or ::IGNORE")};
  }
  std::string action(*action_s);
  const json::string* payload_s = StringField(req.body, "Payload");
  if (payload_s == nullptr) {
    return {Error(conn, req.request_id, 400, "INVALID_PARAMETER",
                  "Payload (base64 string) is required")};
  }
  auto mit = measurements_.find(mid);
  if (mit == measurements_.end() || mit->second.owner_token != *c.token) {
    return {Error(conn, req.request_id, 404, "INVALID_MEASUREMENT",
                  "measurement " + mid + " was not found")};
  }
  Measurement& m = mit->second;
  if (m.closed) {
    return {Error(conn, req.request_id, 400, "MEASUREMENT_CLOSED",
                  "measurement " + mid + " is finished; create a new measurement")};
  }
  std::string why;
  std::optional<std::string> payload = DecodeBase64(*payload_s, &why);
  if (!payload) return {Error(conn, req.request_id, 400, "UNPACKER_RPC_ERROR", why)};
  if (payload->size() < kChunkHeaderLen || payload->compare(0, 4, kChunkMagic) != 0) {
    return {Error(conn, req.request_id, 400, "UNPACKER_RPC_ERROR",
                  "Payload is not SDK chunk data (bad header)")};
  }
  uint32_t order = ReadU32Le(std::string_view(*payload).substr(4));
  uint32_t duration = ReadU32Le(std::string_view(*payload).substr(8));
  if (duration > 3'600'000) {
    return {Error(conn, req.request_id, 400, "UNPACKER_RPC_ERROR",
                  "Payload chunk duration is out of range")};
  }

  const bool first = action.starts_with("FIRST");
  const bool last = action.starts_with("LAST");
  const bool process = action.ends_with("::PROCESS");
  // FIRST restarts at ChunkOrder 0; CHUNK and LAST continue a started measurement.
  uint32_t expected = first ? 0 : m.next_order;
  if (!first && !m.started) {
    return {Error(conn, req.request_id, 400, "MISALIGNED_CHUNK",
                  "ChunkOrder " + std::to_string(order) +
                      " was sent before the measurement was started with FIRST")};
  }
  if (order != expected) {
    return {Error(conn, req.request_id, 400, "MISALIGNED_CHUNK",
                  "ChunkOrder " + std::to_string(order) + " was sent before ChunkOrder " +
                      std::to_string(expected))};
  }

  // Sliding window over receive times, half-open (now - window, now]: a client
  // sending exactly real time (5 s of data every 5 s) stays within it.
  std::vector<RateEntry>& history = rate_by_token_[*c.token];
  int64_t in_window = duration;
  for (auto it = history.rbegin(); it != history.rend() && now - it->at < options_.rate_window;
       ++it) {
    in_window += it->duration_ms;
  }
  if (in_window > options_.rate_window.count()) {
    return {Error(conn, req.request_id, 429, "RATE_LIMIT",
                  "more than " + std::to_string(options_.rate_window.count()) +
                      " ms of chunk data within " +
                      std::to_string(options_.rate_window.count()) + " ms")};
  }

  history.push_back(RateEntry{now, static_cast<int>(duration)});
  if (first) m.data_ms = 0;
  m.started = true;
  m.next_order = order + 1;
  m.data_ms += duration;
  if (last) m.closed = true;
  chunks_.push_back(DfxChunkRecord{mid, action, static_cast<int>(order),
                                   static_cast<int>(duration), now});

  std::string data_id = NewId();
  json::object answer;
  answer["ID"] = data_id;
  answer["ChunkOrder"] = order;
  std::vector<DfxAction> out = {Answer(conn, req.request_id, 200, json::serialize(answer))};

  // Results: one per ::PROCESS chunk, LAST's included; no end-of-results marker (the
  // public page defines none, and a real upstream need not send one).
  if (process) {
    json::object results;
    {
      // Deterministic stand-ins for real signals, derived from the chunk.
      unsigned sum = 0;
      for (size_t i = kChunkHeaderLen; i < payload->size(); ++i) {
        sum += static_cast<unsigned char>((*payload)[i]);
      }
      results["HR_BPM"] = 60 + static_cast<int>(sum % 40);
      results["DataMs"] = m.data_ms;
    }
    json::object result;
    result["ID"] = mid;
    result["MeasurementDataID"] = data_id;
    result["ChunkOrder"] = order;
    result["Action"] = action;
    result["Results"] = std::move(results);
    std::string result_json = json::serialize(result);
    for (const auto& [other, oc] : conns_) {
      for (const Subscription& s : oc.subscriptions) {
        if (s.measurement_id != mid) continue;
        DfxAction push = Answer(other, s.request_id, 200, result_json);
        push.delay = answer_delay_ + result_delay_;
        out.push_back(std::move(push));
      }
    }
  }
  return out;
}

std::vector<DfxAction> DfxProtocol::BroadcastRaw(const std::string& bytes) const {
  std::vector<DfxAction> out;
  for (const auto& [conn, c] : conns_) {
    DfxAction send;
    send.conn = conn;
    send.bytes = bytes;
    out.push_back(std::move(send));
  }
  return out;
}

std::vector<DfxChunkRecord> DfxProtocol::TakeChunks(std::string_view measurement_id) {
  std::vector<DfxChunkRecord> taken, kept;
  for (DfxChunkRecord& c : chunks_) {
    (c.measurement_id == measurement_id ? taken : kept).push_back(std::move(c));
  }
  chunks_ = std::move(kept);
  return taken;
}

int DfxProtocol::MaxDataMsInWindow() const {
  int64_t best = 0;
  for (const auto& [token, history] : rate_by_token_) {
    // Every maximal window ends at some receive time.
    size_t lo = 0;
    int64_t sum = 0;
    for (size_t hi = 0; hi < history.size(); ++hi) {
      sum += history[hi].duration_ms;
      while (history[hi].at - history[lo].at >= options_.rate_window) {
        sum -= history[lo].duration_ms;
        ++lo;
      }
      best = std::max(best, sum);
    }
  }
  return static_cast<int>(best);
}

int DfxProtocol::active_subscriptions() const {
  int n = 0;
  for (const auto& [conn, c] : conns_) n += static_cast<int>(c.subscriptions.size());
  return n;
}

int DfxProtocol::frames_received(std::string_view action) const {
  auto it = frames_by_action_.find(action);
  return it == frames_by_action_.end() ? 0 : it->second;
}

}  // namespace wsbridge::emulator
