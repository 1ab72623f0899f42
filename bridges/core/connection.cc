// The one translation unit that instantiates Beast's WebSocket client, for both plain
// TCP and TLS streams (see connection.h for the contract).
#include "bridges/core/connection.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>

#include <algorithm>
#include <bit>
#include <array>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <tuple>
#include <vector>

#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/write.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/rng.h"
#include "bridges/core/url.h"
#include "bridges/core/ws_codec.h"
#include "bridges/core/ws_handshake.h"

namespace wsbridge::core {

std::string_view ToString(ConnectionState s) {
  switch (s) {
    case ConnectionState::kIdle:
      return "IDLE";
    case ConnectionState::kConnecting:
      return "CONNECTING";
    case ConnectionState::kAuthenticating:
      return "AUTHENTICATING";
    case ConnectionState::kReady:
      return "READY";
    case ConnectionState::kBackingOff:
      return "BACKING_OFF";
    case ConnectionState::kClosed:
      return "CLOSED";
  }
  return "UNKNOWN";
}

std::string_view ToString(DisconnectKind k) {
  switch (k) {
    case DisconnectKind::kError:
      return "ERROR";
    case DisconnectKind::kClosedByPeer:
      return "CLOSED_BY_PEER";
    case DisconnectKind::kAuthRefused:
      return "AUTH_REFUSED";
    case DisconnectKind::kSlowDown:
      return "SLOW_DOWN";
    case DisconnectKind::kClosedByUs:
      return "CLOSED_BY_US";
  }
  return "UNKNOWN";
}

DisconnectKind ClassifyDisconnect(int http_status, uint16_t close_code, bool has_retry_after) {
  if (http_status == 401 || http_status == 403) return DisconnectKind::kAuthRefused;
  if (http_status == 429 || (http_status == 503 && has_retry_after)) return DisconnectKind::kSlowDown;
  switch (close_code) {
    case 0:
      return DisconnectKind::kError;
    // 1008 policy violation is what most services send for a bad or expired token; the
    // 4xxx ones mirror HTTP 401/403 in the private-use range.
    case 1008:
    case 4001:
    case 4003:
    case 4401:
    case 4403:
      return DisconnectKind::kAuthRefused;
    case 1013:  // try again later
    case 4429:
      return DisconnectKind::kSlowDown;
    default:
      return DisconnectKind::kClosedByPeer;
  }
}

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using beast::error_code;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kLog = "connection";
// Reads go into a buffer of this size per io thread (see ReadNow): one TLS record is at
// most 16 KiB; a plain socket hands over what has arrived, up to this.
constexpr std::size_t kReadChunk = 64 * 1024;
// Reads in a row before the connection lets the io thread's other work run.
constexpr int kReadsPerTurn = 8;
// What the reactor reads for a connection when its socket turns readable (ReadAhead).
constexpr std::size_t kReadAheadBytes = 256;
// The longest handshake answer read (header and a refusal's body).
constexpr std::size_t kHandshakeHeaderLimit = 16 * 1024;
constexpr std::size_t kHandshakeBodyLimit = 64 * 1024;

// Debian's abseil has its own string_view type.
absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::string Fmt(Duration d) { return absl::FormatDuration(absl::FromChrono(d)); }

bool IsIpLiteral(const std::string& host) {
  error_code ec;
  net::ip::make_address(host, ec);
  return !ec;
}


// ---------------------------------------------------------------------------------------
// TLS session resumption. A full handshake parses and verifies the upstream's chain and
// signs and checks a CertificateVerify on both ends: most of the CPU of opening a
// session, and the parsed chain stays in memory for the connection's life. A resumed
// one (TLS 1.3 PSK with (EC)DHE, or a TLS 1.2 ticket/session id) skips all of that; the
// connection refers to the first connection's verified peer certificate instead of a
// copy of its own.
//
// Sessions are kept per TLS context (same trust store, verification and client
// certificate) and per peer: the dialled address and port plus the name that was
// verified and sent as SNI, so a session only ever resumes with the server and the name
// its full handshake verified (OpenSSL does not check the name again on resumption).
// Each session is used for one connection only (RFC 8446 C.4: a ticket reused across
// connections links them); every connection stores the tickets it receives, so a pool
// of a few per peer is enough, and a server that declines resumption only costs a full
// handshake.

class TlsSessionStore {
 public:
  TlsSessionStore() = default;
  TlsSessionStore(const TlsSessionStore&) = delete;
  TlsSessionStore& operator=(const TlsSessionStore&) = delete;
  ~TlsSessionStore() {
    for (auto& [key, list] : peers_) {
      for (SSL_SESSION* s : list) SSL_SESSION_free(s);
    }
  }

  // Offers a stored session for `ssl`'s peer (socket `fd`, connected) to its handshake.
  void Resume(SSL* ssl, int fd) {
    const std::optional<std::string> key = PeerKey(ssl, fd);
    if (!key) return;
    SSL_SESSION* session = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = peers_.find(*key);
      if (it == peers_.end()) return;
      const int64_t now = static_cast<int64_t>(std::time(nullptr));
      while (session == nullptr && !it->second.empty()) {
        SSL_SESSION* s = it->second.back();
        it->second.pop_back();
        // A session OpenSSL marked not resumable since it was stored (the connection it
        // belonged to ended without close_notify or with a fatal alert) is dropped.
        if (SSL_SESSION_is_resumable(s) != 1 || Expired(s, now)) {
          SSL_SESSION_free(s);
        } else {
          session = s;
        }
      }
      if (it->second.empty()) peers_.erase(it);
    }
    if (session == nullptr) return;
    SSL_set_session(ssl, session);  // takes its own reference
    SSL_SESSION_free(session);
  }

  // OpenSSL's new-session callback: true when the store took `session`'s reference.
  bool Add(SSL* ssl, SSL_SESSION* session) {
    if (SSL_SESSION_is_resumable(session) != 1) return false;
    const std::optional<std::string> key = PeerKey(ssl, SSL_get_fd(ssl));
    if (!key) return false;
    SSL_SESSION* dropped = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = peers_.find(*key);
      if (it == peers_.end()) {
        if (peers_.size() >= kMaxPeers) return false;
        it = peers_.emplace(*key, std::vector<SSL_SESSION*>{}).first;
      }
      std::vector<SSL_SESSION*>& list = it->second;
      if (list.size() >= kMaxPerPeer) {
        dropped = list.front();  // the oldest
        list.erase(list.begin());
      }
      list.push_back(session);
    }
    if (dropped != nullptr) SSL_SESSION_free(dropped);
    return true;
  }

 private:
  static constexpr std::size_t kMaxPerPeer = 16;
  static constexpr std::size_t kMaxPeers = 256;

  static bool Expired(const SSL_SESSION* s, int64_t now) {
    return static_cast<int64_t>(SSL_SESSION_get_time(s)) + static_cast<int64_t>(SSL_SESSION_get_timeout(s)) <= now;
  }

  // The dialled address and port, the SNI name and the name or address the certificate
  // is checked against (each empty when not set).
  static std::optional<std::string> PeerKey(SSL* ssl, int fd) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    if (fd < 0 || getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return std::nullopt;
    std::string key(reinterpret_cast<const char*>(&addr), std::min<std::size_t>(len, sizeof addr));
    // Runs inside SSL_read (the new-session callback): nothing may stay on the thread's
    // error queue, or SSL_get_error would report the read as failed.
    ERR_set_mark();
    const char* sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    absl::StrAppend(&key, "|", sni != nullptr ? sni : "");
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    const char* host = X509_VERIFY_PARAM_get0_host(param, 0);
    absl::StrAppend(&key, "|", host != nullptr ? host : "");
    if (char* ip = X509_VERIFY_PARAM_get1_ip_asc(param); ip != nullptr) {
      absl::StrAppend(&key, "|", ip);
      OPENSSL_free(ip);
    }
    ERR_pop_to_mark();
    return key;
  }

  std::mutex mu_;
  std::map<std::string, std::vector<SSL_SESSION*>> peers_;
};

// ---------------------------------------------------------------------------------------
// TLS client contexts, shared by every connection with the same settings: building one
// loads the trust store, which is far too expensive to do per session.

struct TlsClientContext {
  ssl::context ctx{ssl::context::tls_client};
  TlsSessionStore sessions;
};

int TlsStoreIndex() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

int OnNewTlsSession(SSL* ssl, SSL_SESSION* session) {
  auto* store = static_cast<TlsSessionStore*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), TlsStoreIndex()));
  return store != nullptr && store->Add(ssl, session) ? 1 : 0;
}

using TlsKey = std::tuple<bool, std::string, std::string, std::string>;

absl::StatusOr<std::shared_ptr<TlsClientContext>> GetTlsContext(const TlsOptions& o) {
  static std::mutex mu;
  static std::map<TlsKey, std::weak_ptr<TlsClientContext>> cache;
  const TlsKey key{o.verify_peer, o.ca_file, o.cert_file, o.key_file};
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) {
    if (auto ctx = it->second.lock()) return ctx;
  }
  auto client = std::make_shared<TlsClientContext>();
  ssl::context* ctx = &client->ctx;
  SSL_CTX* native = ctx->native_handle();
  // tls_client + a 1.2 floor (tlsv12_client would pin exactly 1.2 and refuse 1.3).
  SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION);
  SSL_CTX_set_options(native, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  // Idle sessions keep no read/write buffers (~34 KiB each otherwise).
  SSL_CTX_set_mode(native, SSL_MODE_RELEASE_BUFFERS);
  // New sessions go to the context's TlsSessionStore, not to OpenSSL's own cache.
  SSL_CTX_set_ex_data(native, TlsStoreIndex(), &client->sessions);
  SSL_CTX_set_session_cache_mode(native, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(native, OnNewTlsSession);
  error_code ec;
  if (o.verify_peer) {
    ctx->set_verify_mode(ssl::verify_peer, ec);
    if (o.ca_file.empty()) {
      ctx->set_default_verify_paths(ec);
      if (ec) return absl::FailedPreconditionError(absl::StrCat("loading the system trust store: ", ec.message()));
    } else {
      ctx->load_verify_file(o.ca_file, ec);
      if (ec) {
        return absl::FailedPreconditionError(absl::StrCat(
            "cannot load CA bundle ", o.ca_file, ": ", ec.message(), "; check tls.ca_file"));
      }
    }
  } else {
    ctx->set_verify_mode(ssl::verify_none, ec);
  }
  if (!o.cert_file.empty()) {
    ctx->use_certificate_chain_file(o.cert_file, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load client certificate ", o.cert_file, ": ", ec.message()));
    }
    const std::string& key_file = o.key_file.empty() ? o.cert_file : o.key_file;
    ctx->use_private_key_file(key_file, ssl::context::pem, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load client key ", key_file, ": ", ec.message()));
    }
  }
  // Drop entries whose contexts are gone, so the map does not grow with config reloads.
  for (auto it = cache.begin(); it != cache.end();) {
    it = it->second.expired() ? cache.erase(it) : std::next(it);
  }
  cache[key] = client;
  return client;
}

// Retry-After of a refused upgrade, seconds form only (RFC 9110 10.2.3 also allows an
// HTTP-date, which WebSocket services do not use in practice; it reads as none).
Duration RetryAfterOf(const http::response<http::string_body>& res) {
  const auto it = res.find(http::field::retry_after);
  if (it == res.end()) return Duration::zero();
  const auto v = it->value();
  int64_t seconds = 0;
  if (!absl::SimpleAtoi(absl::string_view(v.data(), v.size()), &seconds) || seconds <= 0) {
    return Duration::zero();
  }
  // Clamped far above any max_retry_after, so the conversion cannot overflow.
  return std::chrono::seconds(std::min<int64_t>(seconds, int64_t{365} * 24 * 3600));
}

absl::Status StatusFromHttp(unsigned status, std::string message) {
  switch (status) {
    case 401:
      return absl::UnauthenticatedError(std::move(message));
    case 403:
      return absl::PermissionDeniedError(std::move(message));
    case 404:
      return absl::NotFoundError(std::move(message));
    case 429:
      return absl::ResourceExhaustedError(std::move(message));
    default:
      if (status >= 500) return absl::UnavailableError(std::move(message));
      return absl::FailedPreconditionError(std::move(message));
  }
}

// ---------------------------------------------------------------------------------------
// The first bytes of each read, taken by Asio's reactor itself: an idle connection waits
// with a receive of up to kReadAheadBytes into this (ConnectionImpl::WaitData), not with
// a wait for readable. A wait for readable costs an epoll_ctl each time it starts (Asio
// re-arms the descriptor so that no edge is missed), and that re-arm also reports the
// socket writable, which wakes the io thread's next epoll_wait for nothing: two system
// calls per message, ~1.3 µs each on the measured machine (docs/performance.md, round
// 13). A receive starts without either.
//
// `drained`: the last read of the socket returned fewer bytes than asked for, so it held
// no more then. Reading again before the next readiness edge would only return EAGAIN;
// with an edge-triggered epoll, bytes that arrive later raise a new edge (Asio then
// reads them as soon as the next receive starts). The plain socket hands these bytes
// out first; over TLS, OpenSSL reads them through the connection's own BIO (TlsStream).
struct ReadAhead {
  std::array<char, kReadAheadBytes> data;
  uint16_t len = 0;  // bytes the last receive took
  uint16_t off = 0;  // of which handed on
  bool drained = false;

  bool empty() const { return off == len; }
  std::string_view Rest() const { return std::string_view(data.data() + off, len - off); }
  // A receive completed with `n` bytes.
  void Filled(std::size_t n) {
    len = static_cast<uint16_t>(n);
    off = 0;
    drained = n < data.size();
  }
};

// ---------------------------------------------------------------------------------------
// TLS straight on the non-blocking socket. asio::ssl::stream stages every byte through
// two 17 KiB vectors plus a BIO pair with two 17 KiB rings: 68 KiB per connection, idle
// or not. Here OpenSSL reads and writes the socket itself (SSL_set_fd), so its own record
// buffers are the only ones and SSL_MODE_RELEASE_BUFFERS frees them while idle. Waiting
// is socket.async_wait on SSL_ERROR_WANT_READ/WRITE. It is an AsyncStream (for the
// handshake's HTTP exchange and for writes); the connection reads frames with
// SSL_read_ex itself (ReadNow), and waits for them with a receive into its ReadAhead.
// OpenSSL reaches the socket through a BIO of ours (TlsStream::Bio): reads take the
// ReadAhead's bytes first, and return "retry" without a system call once it is used up
// and the socket is drained; everything else is what OpenSSL's socket BIO does.

class TlsStream {
 public:
  using executor_type = tcp::socket::executor_type;
  using next_layer_type = tcp::socket;

  template <class Executor>
  TlsStream(Executor&& ex, ssl::context& ctx)
      : socket_(std::forward<Executor>(ex)), ssl_(SSL_new(ctx.native_handle())) {
    if (ssl_ != nullptr) {
      // Retried writes may come from another linearization buffer (same bytes).
      SSL_set_mode(ssl_.get(), SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
      // One recv() takes every record that has arrived, instead of a header read and a
      // body read per record (RELEASE_BUFFERS still frees the buffer once drained).
      SSL_set_read_ahead(ssl_.get(), 1);
    }
  }
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  executor_type get_executor() noexcept { return socket_.get_executor(); }
  tcp::socket& next_layer() noexcept { return socket_; }
  SSL* native_handle() noexcept { return ssl_.get(); }

  template <class Handler>
  auto async_handshake(Handler&& handler) {
    return Run([](SSL* s, std::size_t& n) {
      n = 0;
      return SSL_connect(s);
    }, std::forward<Handler>(handler));
  }

  template <class Buffers, class Handler>
  auto async_read_some(const Buffers& buffers, Handler&& handler) {
    net::mutable_buffer b;
    for (auto it = net::buffer_sequence_begin(buffers); it != net::buffer_sequence_end(buffers); ++it) {
      if (net::mutable_buffer(*it).size() != 0) {
        b = *it;
        break;
      }
    }
    return Run([b](SSL* s, std::size_t& n) {
      if (b.size() == 0) {
        n = 0;
        return 1;
      }
      return SSL_read_ex(s, b.data(), b.size(), &n);
    }, std::forward<Handler>(handler));
  }

  template <class Buffers, class Handler>
  auto async_write_some(const Buffers& buffers, Handler&& handler) {
    // A frame is handed over as header and payload: gather up to one record so they
    // leave in one TLS record and one send().
    return Run([buffers](SSL* s, std::size_t& n) {
      const std::size_t total = net::buffer_size(buffers);
      if (total == 0) {
        n = 0;
        return 1;
      }
      const net::const_buffer first = *net::buffer_sequence_begin(buffers);
      if (first.size() == total || first.size() >= kRecord) {
        return SSL_write_ex(s, first.data(), first.size(), &n);
      }
      thread_local std::array<char, kRecord> gather;
      const std::size_t len = net::buffer_copy(net::buffer(gather), buffers);
      return SSL_write_ex(s, gather.data(), len, &n);
    }, std::forward<Handler>(handler));
  }

  // The connection's ReadAhead (it outlives this stream: both are its Attempt's).
  void UseReadAhead(ReadAhead* ahead) { ahead_ = ahead; }

  // Points OpenSSL at the socket (non-blocking) once it is connected.
  error_code Attach() {
    if (ssl_ == nullptr) return net::error::no_memory;
    if (!socket_.is_open()) return net::error::bad_descriptor;
    if (attached_) return {};
    error_code ec;
    socket_.non_blocking(true, ec);
    if (ec) return ec;
    BIO* bio = BIO_new(Bio::Method());
    if (bio == nullptr) return net::error::no_memory;
    BIO_set_data(bio, this);
    BIO_set_init(bio, 1);
    SSL_set_bio(ssl_.get(), bio, bio);  // one reference, for both directions
    attached_ = true;
    return {};
  }

  // Sends close_notify without waiting for the peer's (the TCP close follows).
  void SendCloseNotify() {
    if (ssl_ == nullptr || !socket_.is_open() || !SSL_is_init_finished(ssl_.get())) return;
    ERR_clear_error();
    SSL_shutdown(ssl_.get());
    ERR_clear_error();
  }

  // The error an SSL call's failure `ret` means; `want` is set (0 otherwise) to
  // SSL_ERROR_WANT_READ or SSL_ERROR_WANT_WRITE when it only has to wait.
  error_code ErrorOf(int ret, int& want) {
    want = 0;
    const int err = SSL_get_error(ssl_.get(), ret);
    switch (err) {
      case SSL_ERROR_WANT_READ:
      case SSL_ERROR_WANT_WRITE:
        want = err;
        return {};
      case SSL_ERROR_ZERO_RETURN:
        return net::error::eof;
      case SSL_ERROR_SYSCALL: {
        const int e = errno;
        const unsigned long code = ERR_get_error();
        if (code != 0) return error_code(static_cast<int>(code), net::error::get_ssl_category());
        if (e == 0) return net::error::eof;
        return error_code(e, net::error::get_system_category());
      }
      default: {
        const unsigned long code = ERR_get_error();
        if (ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING) return net::error::eof;
        return error_code(static_cast<int>(code), net::error::get_ssl_category());
      }
    }
  }

 private:
  static constexpr std::size_t kRecord = 16 * 1024;

  struct SslFree {
    void operator()(SSL* s) const { SSL_free(s); }
  };

  // One SSL call retried on socket readiness until it completes.
  template <class Fn>
  struct Op {
    TlsStream& s;
    Fn fn;
    bool async = false;           // an asynchronous wait happened already
    std::optional<std::pair<error_code, std::size_t>> result;  // set before a deferral

    template <class Self>
    void operator()(Self& self, error_code ec = {}) {
      if (result) return self.complete(result->first, result->second);
      if (ec) return self.complete(ec, 0);
      // Woken by the socket: what the BIO knew of it being drained is out of date.
      if (async && s.ahead_ != nullptr) s.ahead_->drained = false;
      std::size_t n = 0;
      // Never touch a descriptor number after the socket was closed (it may be reused).
      if (const error_code attach = s.Attach()) return Done(self, attach, 0);
      ERR_clear_error();
      const int ret = fn(s.ssl_.get(), n);
      if (ret > 0) return Done(self, {}, n);
      int want = 0;
      const error_code err = s.ErrorOf(ret, want);
      if (want == SSL_ERROR_WANT_READ) {
        async = true;
        return s.socket_.async_wait(net::socket_base::wait_read, std::move(self));
      }
      if (want == SSL_ERROR_WANT_WRITE) {
        async = true;
        return s.socket_.async_wait(net::socket_base::wait_write, std::move(self));
      }
      return Done(self, err, 0);
    }

    // A completion may not run inside the initiating call: defer it once when no
    // wait happened. Straight to the handler's executor (the connection's strand): the
    // socket's own is the plain loop, and a hop through it would then dispatch to the
    // strand from outside it.
    template <class Self>
    void Done(Self& self, error_code ec, std::size_t n) {
      if (async) return self.complete(ec, n);
      result.emplace(ec, n);
      const auto ex = net::get_associated_executor(self, s.get_executor());
      net::post(ex, std::move(self));
    }
  };

  template <class Fn, class Handler>
  auto Run(Fn fn, Handler&& handler) {
    return net::async_compose<Handler, void(error_code, std::size_t)>(
        Op<Fn>{*this, std::move(fn), false, std::nullopt}, handler, socket_);
  }

  // OpenSSL's view of the socket. Only ever called inside an SSL call of this stream,
  // which Attach() made sure of an open socket first.
  struct Bio {
    static BIO_METHOD* Method() {
      static BIO_METHOD* const method = [] {
        // A descriptor BIO: SSL_get_fd finds it (BIO_C_GET_FD below).
        BIO_METHOD* m =
            BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "wsbridge socket");
        if (m != nullptr) {
          BIO_meth_set_read_ex(m, &Read);
          BIO_meth_set_write_ex(m, &Write);
          BIO_meth_set_ctrl(m, &Ctrl);
        }
        return m;
      }();
      return method;
    }

    static int Read(BIO* b, char* out, std::size_t len, std::size_t* n) {
      auto* s = static_cast<TlsStream*>(BIO_get_data(b));
      BIO_clear_retry_flags(b);
      *n = 0;
      if (len == 0) return 0;
      ReadAhead* ahead = s->ahead_;
      if (ahead != nullptr && !ahead->empty()) {
        *n = std::min<std::size_t>(len, ahead->len - ahead->off);
        std::memcpy(out, ahead->data.data() + ahead->off, *n);
        ahead->off = static_cast<uint16_t>(ahead->off + *n);
        return 1;
      }
      if (ahead != nullptr && ahead->drained) {
        BIO_set_retry_read(b);
        return 0;
      }
      const ssize_t r = ::read(s->socket_.native_handle(), out, len);
      if (r > 0) {
        *n = static_cast<std::size_t>(r);
        if (ahead != nullptr && *n < len) ahead->drained = true;
        return 1;
      }
      if (r == 0) {
        s->eof_ = true;
      } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        BIO_set_retry_read(b);
      }
      return 0;
    }

    static int Write(BIO* b, const char* in, std::size_t len, std::size_t* n) {
      auto* s = static_cast<TlsStream*>(BIO_get_data(b));
      BIO_clear_retry_flags(b);
      *n = 0;
      const ssize_t r = ::send(s->socket_.native_handle(), in, len, MSG_NOSIGNAL);
      if (r >= 0) {
        *n = static_cast<std::size_t>(r);
        return 1;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) BIO_set_retry_write(b);
      return 0;
    }

    static long Ctrl(BIO* b, int cmd, long, void* ptr) {
      auto* s = static_cast<TlsStream*>(BIO_get_data(b));
      switch (cmd) {
        case BIO_CTRL_FLUSH:
          return 1;
        case BIO_CTRL_EOF:
          return s->eof_ ? 1 : 0;
        case BIO_C_GET_FD: {  // SSL_get_fd (the TlsSessionStore keys sessions by the peer)
          const int fd = static_cast<int>(s->socket_.native_handle());
          if (ptr != nullptr) *static_cast<int*>(ptr) = fd;
          return fd;
        }
        default:
          return 0;
      }
    }
  };

  tcp::socket socket_;
  std::unique_ptr<SSL, SslFree> ssl_;
  ReadAhead* ahead_ = nullptr;
  bool attached_ = false;
  bool eof_ = false;  // a read returned 0: the peer closed the stream
};

// Random mask keys (RFC 6455 5.3 asks for unpredictable ones) and handshake nonces,
// drawn from OpenSSL's generator 64 keys at a time per thread.
uint32_t MaskKey() {
  thread_local std::array<uint32_t, 64> keys;
  thread_local std::size_t next = keys.size();
  if (next == keys.size()) {
    if (RAND_bytes(reinterpret_cast<unsigned char*>(keys.data()), sizeof keys) != 1) {
      thread_local Rng fallback = Rng::FromEntropy();
      for (uint32_t& k : keys) k = static_cast<uint32_t>(fallback());
    }
    next = 0;
  }
  return keys[next++];
}

// Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 4.1).
std::string HandshakeKey() {
  unsigned char raw[16];
  for (int i = 0; i < 4; ++i) {
    const uint32_t k = MaskKey();
    std::memcpy(raw + 4 * i, &k, 4);
  }
  unsigned char b64[25];
  const int n = EVP_EncodeBlock(b64, raw, sizeof raw);
  return std::string(reinterpret_cast<const char*>(b64), static_cast<std::size_t>(n));
}

// RFC 9110 5.6.2 token characters (header names).
bool IsToken(std::string_view s) {
  if (s.empty()) return false;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7F) return false;
    if (std::string_view("\"(),/:;<=>?@[\\]{}").find(c) != std::string_view::npos) return false;
  }
  return true;
}

// A header value must not end the line or the header early.
bool IsFieldValue(std::string_view s) {
  return s.find_first_of(std::string_view("\r\n\0", 3)) == std::string_view::npos;
}

// What the WebSocket handshake needs while it runs; dropped once the connection opens.
struct Handshake {
  std::string key;
  std::string request;
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
};

// The data frames of one write when several messages wait: their headers (each payload
// is its queue entry, masked in place) and the buffer sequence over both. 2 buffers per
// frame: one writev's worth of Asio's 64 on a plain socket; the TLS stream gathers them
// into records.
struct WriteBatch {
  static constexpr std::size_t kMaxFrames = 32;
  static constexpr std::size_t kMaxBytes = 64 * 1024;  // frames are added until past it
  std::array<std::array<char, ws::kMaxClientHeaderBytes>, kMaxFrames> headers;
  std::array<net::const_buffer, 2 * kMaxFrames> buffers;
};

// One connection attempt: the stream and what its in-flight operations need. Held by
// shared_ptr from every pending handler, so the stream outlives its operations even
// after the connection moved on to the next attempt.
template <class Stream>
struct Attempt {
  template <class... Args>
  explicit Attempt(uint64_t g, std::size_t max_message_bytes, Args&&... args)
      : gen(g), stream(std::forward<Args>(args)...), reader(max_message_bytes) {
    if constexpr (!std::is_same_v<Stream, tcp::socket>) stream.UseReadAhead(&ahead);
  }

  tcp::socket& socket() {
    if constexpr (std::is_same_v<Stream, tcp::socket>) {
      return stream;
    } else {
      return stream.next_layer();
    }
  }

  const uint64_t gen;
  Stream stream;
  ws::Reader reader;
  // What the last receive took while waiting for data (WaitData); over TLS, ciphertext
  // that OpenSSL reads through the stream's BIO.
  ReadAhead ahead;
  error_code read_error;  // the receive's, kept while reads are paused
  // Bytes read but not yet handed to `reader` (only when reads paused in the middle of
  // them); empty, with no capacity, otherwise.
  std::string rx;
  std::unique_ptr<Handshake> handshake;
  // The frame being written: a data frame's header (its payload is the queue's front,
  // masked in place) or a whole control frame.
  std::array<char, ws::kMaxClientHeaderBytes> header{};
  std::string control;
  // Several data frames written together (see ConnectionImpl::DoWrite): made the first
  // time more than one message waits, then kept; `batch` is how many are in flight.
  std::unique_ptr<WriteBatch> gather;
  uint32_t batch = 0;
  // Control frames waiting for the write in flight.
  std::optional<std::string> pong_due;  // the latest ping's payload (RFC 6455 5.5.3)
  bool ping_due = false;
  Clock::time_point last_rx{};
  bool reading = false;  // a read is running, posted or waiting for readable
  bool writing = false;
  bool timed_out = false;  // the connect, TLS or WebSocket handshake deadline fired
};

using PlainAttempt = Attempt<tcp::socket>;
using TlsAttempt = Attempt<TlsStream>;

class ConnectionImpl final : public Connection {
 public:
  ConnectionImpl(Strand strand, std::shared_ptr<const ConnectionOptions> options, std::string name,
                 std::weak_ptr<ConnectionHandler> handler)
      : strand_(std::move(strand)),
        shared_options_(std::move(options)),
        options_(*shared_options_),
        name_(std::move(name)),
        handler_(std::move(handler)),
        backoff_(options_.backoff),
        auth_backoff_(options_.auth_backoff),
        // The timer and the resolver sit on the plain io executor and every handler runs
        // on the strand (bound to it, or through Unbound for the timer's waits): an
        // any_io_executor holding a strand does not fit the type-erased executor's inline
        // storage, so a timer built on the strand would cost a heap allocation for its
        // whole life.
        timer_(strand_.get_inner_executor()) {
    due_.fill(Clock::time_point::max());
  }

  // --- Strand only. ---
  void Start() override {
    if (state_.load() != ConnectionState::kIdle) return;
    StartAttempt();
  }

  absl::Status Send(std::string payload, bool binary) override {
    if (!open_ || closing_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "upstream connection ", name_, " is not open (", AV(ToString(state_.load())), ")"));
    }
    if (!queue_.empty() && (queue_.size() >= options_.send_queue_max_messages ||
                            queued_bytes_ + payload.size() > options_.send_queue_max_bytes)) {
      want_writable_ = true;
      return absl::ResourceExhaustedError(absl::StrCat(
          "upstream send queue of ", name_, " is full (", queue_.size(), " messages, ",
          queued_bytes_, " bytes); wait for OnWritable"));
    }
    queued_bytes_ += payload.size();
    queue_.push_back(Outgoing{std::move(payload), binary});
    WithAttempt([&](auto& a) {
      if (!a->writing) DoWrite(a);
    });
    return absl::OkStatus();
  }

  void MarkAuthenticating() override {
    if (open_ && !closing_) state_.store(ConnectionState::kAuthenticating);
  }

  void MarkReady() override {
    if (!open_ || closing_ || state_.load() == ConnectionState::kReady) return;
    // ready_since first: whoever sees kReady (another thread: the admin API, a test) then
    // sees when it began, not 0.
    stats_.ready_since_unix_ms.store(absl::ToUnixMillis(absl::Now()));
    state_.store(ConnectionState::kReady);
    log::Info(kLog, "upstream ready", {{"name", name_}, {"target", Target()}});
    Arm(kHealthy, Later(options_.backoff.reset_after), gen_);
    if (options_.keepalive.heartbeat_interval > Duration::zero()) ArmHeartbeat();
  }

  void Reconnect(const absl::Status& reason, DisconnectKind kind) override {
    const ConnectionState s = state_.load();
    if (s == ConnectionState::kClosed || s == ConnectionState::kIdle || closing_) return;
    if (s == ConnectionState::kBackingOff) return;  // one attempt in flight at any time
    log::Warn(kLog, "reconnecting upstream",
              {{"name", name_}, {"kind", std::string(ToString(kind))},
               {"reason", log::Redact(reason.ToString())}});
    DisconnectInfo info = Info(reason);
    info.kind = kind;
    info.was_open = open_;
    Teardown();
    Ended(std::move(info), /*classify=*/false);
  }

  void Close(uint16_t code, std::string_view reason) override {
    const ConnectionState s = state_.load();
    if (s == ConnectionState::kClosed || closing_) return;
    closing_ = true;
    ++retry_gen_;
    Disarm(kRetry);
    Disarm(kStep);
    if (resolver_) resolver_->cancel();
    if (!open_) return EndClosedByUs(absl::CancelledError("closed before the connection opened"));
    close_code_ = code;
    close_text_ = std::string(reason);
    Arm(kClose, Later(options_.close_timeout), gen_);
    WithAttempt([&](auto& a) { DoWrite(a); });
  }

  void PauseReads() override { paused_ = true; }

  void ResumeReads() override {
    if (!paused_) return;
    paused_ = false;
    WithAttempt([&](auto& a) {
      // Traffic was not read while paused; do not count that as silence.
      a->last_rx = Clock::now();
      ping_sent_.reset();
      if (open_) DoRead(a);
    });
  }

  size_t queued_messages() const override { return queue_.size(); }

  // --- Any thread. ---
  ConnectionState state() const override { return state_.load(); }
  const ConnectionStats& stats() const override { return stats_; }
  const ConnectionOptions& options() const override { return options_; }
  const std::string& name() const override { return name_; }
  std::string last_error() const override {
    absl::MutexLock lock(&mu_);
    return last_error_;
  }
  std::string target() const override { return Target(); }
  const Strand& strand() const override { return strand_; }

 private:
  // A queued message. DoWrite masks `payload` in place when it starts writing it, so a
  // message is never written twice: Teardown drops the queue with the attempt. Anything
  // that would keep the queue for another connection must unmask what was started.
  struct Outgoing {
    std::string payload;
    bool binary;
  };

  std::shared_ptr<ConnectionImpl> Self() {
    return std::static_pointer_cast<ConnectionImpl>(shared_from_this());
  }

  std::string Target() const {
    absl::MutexLock lock(&mu_);
    return target_;
  }

  // Runs `f` with the current attempt, whichever stream type it has.
  template <class F>
  void WithAttempt(F&& f) {
    if (plain_) {
      f(plain_);
    } else if (tls_) {
      f(tls_);
    }
  }

  template <class A>
  bool Current(const std::shared_ptr<A>& a) const {
    return a && a->gen == gen_ && (static_cast<const void*>(a.get()) == plain_.get() ||
                                   static_cast<const void*>(a.get()) == tls_.get());
  }

  // Calls the handler if it is still there; otherwise shuts down quietly. Returns
  // whether it was called.
  template <class F>
  bool Notify(F&& f) {
    std::shared_ptr<ConnectionHandler> h = handler_.lock();
    if (!h) {
      Shutdown();
      return false;
    }
    f(*h);
    return true;
  }

  // The owner is gone: stop everything without callbacks.
  void Shutdown() {
    closing_ = true;
    stats_.retry_delay_ms.store(0);
    ++retry_gen_;
    Disarm(kRetry);
    if (resolver_) resolver_->cancel();
    Teardown();
    state_.store(ConnectionState::kClosed);
  }

  // --- Attempt ------------------------------------------------------------------------

  void StartAttempt() {
    if (closing_ || state_.load() == ConnectionState::kClosed) return;
    state_.store(ConnectionState::kConnecting);
    stats_.attempts.fetch_add(1);
    stats_.retry_delay_ms.store(0);
    ++gen_;
    absl::StatusOr<HandshakeRequest> request;
    if (!Notify([&](ConnectionHandler& h) { request = h.PrepareHandshake(); })) return;
    if (closing_ || state_.load() != ConnectionState::kConnecting) return;
    if (!request.ok()) return FailAttempt(request.status());
    absl::StatusOr<ParsedUrl> url = ParseUrl(request->url, "wss", "ws", "upstream URL");
    if (!url.ok()) return FailAttempt(url.status());
    {
      absl::MutexLock lock(&mu_);
      target_ = log::RedactUrl(request->url);
    }
    if (!url->tls && !options_.allow_plaintext) {
      // A configuration error: retrying cannot fix it.
      const absl::Status st = absl::FailedPreconditionError(absl::StrCat(
          "refusing plaintext ws:// upstream ", Target(), " for ", name_,
          ": use wss://, or set allow_plaintext: true (only for local emulators and tests)"));
      SetLastError(st);
      log::Error(kLog, "upstream refused", {{"name", name_}, {"error", std::string(st.message())}});
      closing_ = true;
      Finish(Info(st));
      return;
    }
    dial_ = std::make_unique<Dial>(Dial{*std::move(request), *std::move(url)});

    if (dial_->url.tls) {
      absl::StatusOr<std::shared_ptr<TlsClientContext>> ctx = GetTlsContext(options_.tls);
      if (!ctx.ok()) return FailAttempt(ctx.status());
      tls_ctx_ = *ctx;
      tls_ = std::make_shared<TlsAttempt>(gen_, options_.max_message_bytes, strand_.get_inner_executor(),
                                          tls_ctx_->ctx);
      SSL* native = tls_->stream.native_handle();
      if (native == nullptr) {
        return FailAttempt(absl::ResourceExhaustedError("cannot create a TLS session (out of memory)"));
      }
      const std::string& name = options_.tls.server_name.empty() ? dial_->url.host : options_.tls.server_name;
      const bool ip = IsIpLiteral(name);
      // SNI carries host names only; an IP literal is not allowed there (RFC 6066).
      if (!ip && SSL_set_tlsext_host_name(native, name.c_str()) != 1) {
        return FailAttempt(absl::InvalidArgumentError(absl::StrCat("bad TLS server name \"", name, "\"")));
      }
      if (options_.tls.verify_peer) {
        const int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(native), name.c_str())
                          : SSL_set1_host(native, name.c_str());
        if (ok != 1) {
          return FailAttempt(absl::InvalidArgumentError(absl::StrCat("bad TLS server name \"", name, "\"")));
        }
      }
    } else {
      plain_ = std::make_shared<PlainAttempt>(gen_, options_.max_message_bytes, strand_.get_inner_executor());
    }
    log::Debug(kLog, "connecting", {{"name", name_}, {"target", Target()}});

    // An address needs no lookup: the resolver hands every lookup to its one background
    // thread and the answer back (two thread wake-ups per attempt, all attempts in line).
    error_code not_literal;
    const net::ip::address literal = net::ip::make_address(dial_->url.host, not_literal);
    uint32_t port = 0;
    if (!not_literal && absl::SimpleAtoi(AV(dial_->url.port), &port) && port <= 65535) {
      const auto results = tcp::resolver::results_type::create(
          tcp::endpoint(literal, static_cast<uint16_t>(port)), dial_->url.host, dial_->url.port);
      return WithAttempt([&](auto& a) { OnResolve(a, {}, results); });
    }

    const uint64_t gen = gen_;
    auto self = Self();
    Arm(kStep, Later(options_.connect_timeout), gen_);
    // Made for the lookup and dropped once connected (OnConnect): an open connection
    // keeps no resolver object.
    if (!resolver_) resolver_ = std::make_unique<tcp::resolver>(strand_.get_inner_executor());
    resolver_->async_resolve(dial_->url.host, dial_->url.port,
                            net::bind_executor(strand_, [self, gen](error_code ec,
                                                                    tcp::resolver::results_type results) {
                              if (gen != self->gen_) return;
                              self->Disarm(kStep);
                              self->WithAttempt([&](auto& a) { self->OnResolve(a, ec, results); });
                            }));
  }

  template <class A>
  void OnResolve(std::shared_ptr<A> a, error_code ec, const tcp::resolver::results_type& results) {
    if (!Current(a)) return;
    if (ec) {
      if (ec == net::error::operation_aborted) {
        return FailAttempt(absl::DeadlineExceededError(absl::StrCat(
            "resolving ", dial_->url.host, " timed out after ", Fmt(options_.connect_timeout))));
      }
      return FailAttempt(absl::UnavailableError(absl::StrCat("resolving ", dial_->url.host, ": ", ec.message())));
    }
    ArmDeadline(a, options_.connect_timeout);
    net::async_connect(a->socket(), results,
                       net::bind_executor(strand_, [self = Self(), a](error_code ec, const tcp::endpoint&) {
                         self->OnConnect(a, ec);
                       }));
  }

  // The connect, TLS and WebSocket handshakes each run under a deadline that cancels
  // the socket's operations; `timed_out` tells the failure it caused.
  template <class A>
  void ArmDeadline(const std::shared_ptr<A>& a, Duration timeout) {
    Arm(kStep, Later(timeout), a->gen);
  }

  // The deadline's step finished: true when it is still the current attempt's and the
  // deadline did not fire.
  template <class A>
  bool StepDone(const std::shared_ptr<A>& a) {
    if (!Current(a)) return false;
    Disarm(kStep);
    return true;
  }

  template <class A>
  void OnConnect(std::shared_ptr<A> a, error_code ec) {
    if (!StepDone(a)) return;
    resolver_.reset();
    if (ec) {
      if (a->timed_out) {
        return FailAttempt(absl::DeadlineExceededError(absl::StrCat(
            "connecting to ", dial_->url.host_header, " timed out after ", Fmt(options_.connect_timeout))));
      }
      return FailAttempt(
          absl::UnavailableError(absl::StrCat("connecting to ", dial_->url.host_header, ": ", ec.message())));
    }
    error_code ignored;
    a->socket().set_option(tcp::no_delay(true), ignored);
    if constexpr (std::is_same_v<A, TlsAttempt>) {
      ArmDeadline(a, options_.handshake_timeout);
      tls_ctx_->sessions.Resume(a->stream.native_handle(), static_cast<int>(a->socket().native_handle()));
      a->stream.async_handshake(net::bind_executor(strand_, [self = Self(), a](error_code ec, std::size_t) {
        if (self->StepDone(a)) self->OnTlsHandshake(a, ec);
      }));
    } else {
      error_code nb;
      a->socket().non_blocking(true, nb);
      if (nb) return FailAttempt(absl::UnavailableError(absl::StrCat("socket setup failed: ", nb.message())));
      DoWsHandshake(a);
    }
  }

  void OnTlsHandshake(std::shared_ptr<TlsAttempt> a, error_code ec) {
    if (ec) {
      if (a->timed_out) {
        return FailAttempt(absl::DeadlineExceededError(absl::StrCat(
            "TLS handshake with ", dial_->url.host_header, " timed out after ", Fmt(options_.handshake_timeout))));
      }
      std::string detail = ec.message();
      const long verify = SSL_get_verify_result(a->stream.native_handle());
      if (verify != X509_V_OK) {
        absl::StrAppend(&detail, " (", X509_verify_cert_error_string(verify),
                        "; check tls.ca_file / tls.server_name)");
      }
      return FailAttempt(absl::UnavailableError(
          absl::StrCat("TLS handshake with ", dial_->url.host_header, " failed: ", detail)));
    }
    DoWsHandshake(a);
  }

  // --- WebSocket handshake (RFC 6455 4.1) ---------------------------------------------

  template <class A>
  void DoWsHandshake(std::shared_ptr<A> a) {
    auto hs = std::make_unique<Handshake>();
    hs->key = HandshakeKey();
    std::string& r = hs->request;
    absl::StrAppend(&r, "GET ", dial_->url.target, " HTTP/1.1\r\nHost: ", dial_->url.host_header,
                    "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ", hs->key,
                    "\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wsbridge\r\n");
    for (const auto& [name, value] : dial_->request.headers) {
      // A line break in a header would end the request early or smuggle in another
      // header; credentials come from files and the environment, so say which one.
      if (!IsToken(name) || !IsFieldValue(value)) {
        return FailAttempt(absl::InvalidArgumentError(absl::StrCat(
            "handshake header \"", log::Redact(name), "\" has ",
            IsToken(name) ? "a line break or NUL in its value" : "a name that is not an HTTP token",
            "; check the bridge's headers and secrets")));
      }
      absl::StrAppend(&r, name, ": ", value, "\r\n");
    }
    if (!dial_->request.subprotocols.empty()) {
      const std::string protocols = absl::StrJoin(dial_->request.subprotocols, ", ");
      if (!IsFieldValue(protocols)) {
        return FailAttempt(absl::InvalidArgumentError("a subprotocol has a line break or NUL"));
      }
      absl::StrAppend(&r, "Sec-WebSocket-Protocol: ", protocols, "\r\n");
    }
    r.append("\r\n");
    hs->parser.header_limit(kHandshakeHeaderLimit);
    hs->parser.body_limit(kHandshakeBodyLimit);
    a->handshake = std::move(hs);
    ArmDeadline(a, options_.handshake_timeout);
    net::async_write(a->stream, net::buffer(a->handshake->request),
                     net::bind_executor(strand_, [self = Self(), a](error_code ec, std::size_t) {
                       if (!self->Current(a)) return;
                       if (ec) return self->OnWsHandshake(a, ec);
                       http::async_read(a->stream, a->handshake->buffer, a->handshake->parser,
                                        net::bind_executor(self->strand_, [self, a](error_code ec, std::size_t) {
                                          self->OnWsHandshake(a, ec);
                                        }));
                     }));
  }

  template <class A>
  void OnWsHandshake(std::shared_ptr<A> a, error_code ec) {
    if (!StepDone(a)) return;
    Handshake& hs = *a->handshake;
    // A refusal whose body is longer than we read still has its status.
    const bool have_header = hs.parser.is_header_done();
    if (ec && !(have_header && hs.parser.get().result_int() != 101)) {
      if (a->timed_out) {
        return FailAttempt(absl::DeadlineExceededError(absl::StrCat(
            "WebSocket handshake with ", dial_->url.host_header, " timed out after ",
            Fmt(options_.handshake_timeout))));
      }
      return FailAttempt(absl::UnavailableError(
          absl::StrCat("WebSocket handshake with ", dial_->url.host_header, " failed: ", ec.message())));
    }
    const http::response<http::string_body>& res = hs.parser.get();
    if (res.result_int() != 101) {
      DisconnectInfo info;
      info.http_status = static_cast<int>(res.result_int());
      info.retry_after = RetryAfterOf(res);
      std::string body = res.body().substr(0, 200);
      absl::StripAsciiWhitespace(&body);
      info.http_body = log::Redact(body);
      const std::string retry_after =
          info.retry_after > Duration::zero() ? absl::StrCat(" (Retry-After ", Fmt(info.retry_after), ")") : "";
      info.reason = StatusFromHttp(
          res.result_int(),
          log::Redact(absl::StrCat("WebSocket upgrade refused by ", dial_->url.host_header, " with HTTP ",
                                   res.result_int(), retry_after, body.empty() ? "" : ": ", body)));
      return FailAttempt(std::move(info));
    }
    std::string negotiated;
    if (absl::Status st = ws::CheckUpgradeAnswer(res, hs.key, dial_->request.subprotocols, &negotiated); !st.ok()) {
      if (absl::IsUnavailable(st)) {
        st = absl::UnavailableError(
            absl::StrCat("WebSocket handshake with ", dial_->url.host_header, " failed: ", st.message()));
      }
      return FailAttempt(st);
    }
    // Frames the server sent right behind its answer are read first.
    const auto rest = hs.buffer.cdata();
    if (rest.size() != 0) a->rx.assign(static_cast<const char*>(rest.data()), rest.size());
    // Keep nothing of the handshake for the connection's lifetime: the answer, the
    // request (which may carry credentials) and the URL are rebuilt on every attempt.
    a->handshake.reset();
    dial_.reset();
    open_ = true;
    if (opened_before_) stats_.reconnects.fetch_add(1);
    opened_before_ = true;
    a->last_rx = Clock::now();
    ping_sent_.reset();
    last_ping_ = Clock::now();
    log::Info(kLog, "upstream connected", {{"name", name_}, {"target", Target()}});
    DoRead(a);
    ArmKeepalive(a);
    Notify([&](ConnectionHandler& h) { h.OnOpen(negotiated); });
  }

  // --- Reading ------------------------------------------------------------------------
  //
  // While the connection is idle, one receive of up to kReadAheadBytes into the
  // attempt's ReadAhead waits on the socket (WaitData). When it completes, ReadNow hands
  // out every complete event from those bytes and whatever else has arrived, read with
  // non-blocking calls into the io thread's buffer, until the socket is drained. An idle
  // connection so holds no read buffer but its 256-byte ReadAhead, and no operation chain
  // (docs/performance.md, rounds 9 and 13).

  // Starts reading (after the handshake, or once reads resume). Never reads in the
  // calling frame: the handler may be inside a callback of this connection.
  template <class A>
  void DoRead(std::shared_ptr<A> a) {
    if (paused_ || a->reading || !Current(a) || !open_) return;
    a->reading = true;
    net::post(strand_, [self = Self(), a] {
      a->reading = false;
      self->ReadNow(a);
    });
  }

  // The completion handler of a wait that stays pending while the connection is idle
  // (the timer's): it runs `f(*this, ec)` on the strand. A handler bound to the strand
  // (bind_executor) would hold the strand twice for the wait's whole life, its own copy
  // and the operation's work on it (72 bytes each, per idle connection); this one holds
  // the connection only and goes onto the strand when it runs, which is what the
  // binding did.
  template <class F>
  auto Unbound(F f) {
    return [self = Self(), f = std::move(f)](error_code ec) mutable {
      ConnectionImpl* c = self.get();
      net::dispatch(c->strand_, [self = std::move(self), f = std::move(f), ec]() mutable { f(*self, ec); });
    };
  }

  // Waits for data with a receive into a->ahead, which is used up (see ReadAhead).
  template <class A>
  void WaitData(const std::shared_ptr<A>& a) {
    a->reading = true;
    // Bound to the strand, unlike the timer's waits (Unbound): this one completes once
    // per read, and unbound it saved ~0.15 KiB per idle session but measured more CPU
    // per DFX chunk and per fan-out delivery (docs/performance.md, round 10).
    a->socket().async_read_some(
        net::buffer(a->ahead.data), net::bind_executor(strand_, [self = Self(), a](error_code ec, std::size_t n) {
          a->reading = false;
          // Bytes and an error are both kept while reads are paused; ReadNow hands the
          // bytes out first. The error must be kept: after a read that reported the
          // stream's end or an error, Asio tries the socket again only on the next
          // readiness edge, which never comes.
          a->ahead.Filled(n);
          if (ec) a->read_error = ec;
          if (!self->Current(a) || self->paused_) return;
          self->ReadNow(a);
        }));
  }

  // Waits until the socket is writable: OpenSSL's read needs to write first.
  template <class A>
  void WaitWritable(const std::shared_ptr<A>& a) {
    a->reading = true;
    a->socket().async_wait(net::socket_base::wait_write,
                           net::bind_executor(strand_, [self = Self(), a](error_code ec) {
                             a->reading = false;
                             if (!self->Current(a) || self->paused_) return;
                             if (ec) return self->OnReadError(ec);
                             self->ReadNow(a);
                           }));
  }

  // Reads into one buffer per io thread. A callback may run another connection's reads
  // on this thread (a strand run inline); that one then uses a buffer of its own.
  struct ReadBuffer {
    ReadBuffer() {
      if (!busy) {
        busy = true;
        owner = true;
        if (!shared) shared.reset(new char[kReadChunk]);
        data = shared.get();
      } else {
        own.reset(new char[kReadChunk]);
        data = own.get();
      }
    }
    ~ReadBuffer() {
      if (owner) busy = false;
    }
    static inline thread_local std::unique_ptr<char[]> shared;
    static inline thread_local bool busy = false;
    bool owner = false;
    std::unique_ptr<char[]> own;
    char* data = nullptr;
  };

  template <class A>
  void ReadNow(std::shared_ptr<A> a) {
    if (a->reading || !Current(a) || paused_) return;
    a->reading = true;  // nothing else starts a read of `a` meanwhile
    // Bytes left over from a pause first.
    if (!a->rx.empty()) {
      std::string rx = std::move(a->rx);
      std::string_view in(rx);
      if (!Deliver(a, in)) return Stopped(a, in);
    }
    if (a->read_error) {
      a->reading = false;
      return OnReadError(std::exchange(a->read_error, {}));
    }
    // Then, on a plain socket, what the receive that woke us took (over TLS, OpenSSL
    // reads it through the BIO).
    if constexpr (std::is_same_v<A, PlainAttempt>) {
      if (!a->ahead.empty()) {
        std::string_view in = a->ahead.Rest();
        a->ahead.off = a->ahead.len;
        a->last_rx = Clock::now();
        if (!Deliver(a, in)) return Stopped(a, in);
      }
    }
    ReadBuffer buffer;
    for (int turn = 0; turn < kReadsPerTurn; ++turn) {
      std::size_t n = 0;
      int want = 0;
      error_code ec = ReadSome(a, buffer.data, n, want);
      if (want == SSL_ERROR_WANT_WRITE) {
        a->reading = false;
        return WaitWritable(a);
      }
      if (want != 0) return Drained(a);
      if (ec) {
        a->reading = false;
        return OnReadError(ec);
      }
      a->last_rx = Clock::now();
      std::string_view in(buffer.data, n);
      if (!Deliver(a, in)) return Stopped(a, in);
    }
    // A busy connection lets the thread's other work run between its turns.
    a->reading = false;
    DoRead(a);
  }

  // Nothing more to read now: wait for data.
  template <class A>
  void Drained(const std::shared_ptr<A>& a) {
    a->reading = false;
    a->reader.ReleaseMemory();
    WaitData(a);
  }

  // Delivery stopped before `in` was used up: keep the rest if the connection is still
  // this attempt's (paused reads resume with it).
  template <class A>
  void Stopped(const std::shared_ptr<A>& a, std::string_view in) {
    a->reading = false;
    if (!Current(a)) return;
    if (!in.empty()) a->rx.assign(in.data(), in.size());
    if (!paused_ && !a->reader.done()) DoRead(a);
  }

  // One non-blocking read: n bytes, or `want` (SSL_ERROR_WANT_READ/WRITE) when it would
  // block, or an error (eof when the peer closed the stream).
  template <class A>
  error_code ReadSome(const std::shared_ptr<A>& a, char* data, std::size_t& n, int& want) {
    want = 0;
    if constexpr (std::is_same_v<A, TlsAttempt>) {
      if (const error_code attach = a->stream.Attach()) return attach;
      ERR_clear_error();
      const int ret = SSL_read_ex(a->stream.native_handle(), data, kReadChunk, &n);
      if (ret > 0) return {};
      return a->stream.ErrorOf(ret, want);
    } else {
      // Drained (see ReadAhead): nothing to read before the next edge.
      if (a->ahead.drained) {
        want = SSL_ERROR_WANT_READ;
        return {};
      }
      error_code ec;
      n = a->socket().read_some(net::buffer(data, kReadChunk), ec);
      if (ec == net::error::would_block || ec == net::error::try_again) {
        want = SSL_ERROR_WANT_READ;
        return {};
      }
      if (!ec && n < kReadChunk) a->ahead.drained = true;
      return ec;
    }
  }

  // Hands out every complete event in `in`. False when the connection stopped reading
  // (paused, closed, failed or moved on); `in` then holds what was not used.
  template <class A>
  bool Deliver(const std::shared_ptr<A>& a, std::string_view& in) {
    for (;;) {
      ws::Reader::Event e = a->reader.Next(in);
      switch (e.kind) {
        case ws::Reader::Event::kNeedMore:
          return true;
        case ws::Reader::Event::kMessage:
          stats_.frames_in.fetch_add(1, std::memory_order_relaxed);
          stats_.bytes_in.fetch_add(e.payload.size(), std::memory_order_relaxed);
          if (!Notify([&](ConnectionHandler& h) { h.OnMessage(e.payload, e.binary); })) return false;
          if (!Current(a) || paused_) return false;
          break;
        case ws::Reader::Event::kPing:
          a->pong_due.emplace(e.payload);
          if (!a->writing) DoWrite(a);
          if (!Current(a)) return false;
          break;
        case ws::Reader::Event::kPong:
          break;
        case ws::Reader::Event::kClose:
          OnPeerClose(a, e.close_code, e.payload);
          return false;
        case ws::Reader::Event::kError:
          OnProtocolError(a, e);
          return false;
      }
    }
    return true;
  }

  // The upstream's close frame: the answer to ours, or its own close.
  template <class A>
  void OnPeerClose(const std::shared_ptr<A>& a, uint16_t code, std::string_view reason) {
    if (closing_) {
      // Our close handshake finished.
      SendCloseNotify(a);
      return EndClosedByUs(CloseStatus());
    }
    DisconnectInfo info;
    info.was_open = true;
    info.close_code = code;
    info.close_reason = log::Redact(reason);
    info.reason = absl::UnavailableError(absl::StrCat("upstream closed the connection (code ", info.close_code,
                                                      info.close_reason.empty() ? "" : ": ", info.close_reason,
                                                      ")"));
    // Echo the close (RFC 6455 5.5.1) when no other frame is being written; the write
    // starts at once, so it leaves before the socket closes.
    SendFinalFrame(a, code == 1005 ? 0 : code);
    Lost(std::move(info));
  }

  template <class A>
  void OnProtocolError(const std::shared_ptr<A>& a, const ws::Reader::Event& e) {
    SendFinalFrame(a, e.close_code);
    if (e.close_code == 1009) {
      return Lost(absl::ResourceExhaustedError(absl::StrCat(
          "upstream sent a message larger than max_message_bytes (", options_.max_message_bytes,
          " bytes); raise the limit if such messages are expected")));
    }
    Lost(absl::UnavailableError(
        absl::StrCat("upstream connection lost: ", e.error.message(), " (closed with code ", e.close_code, ")")));
  }

  // A close frame written as the connection ends (best effort: not when another frame
  // is half written), then close_notify.
  template <class A>
  void SendFinalFrame(const std::shared_ptr<A>& a, uint16_t code) {
    if (a->writing) return;
    a->writing = true;
    a->control = ws::ClientFrame(ws::Opcode::kClose, ws::ClosePayload(code, ""), MaskKey());
    net::async_write(a->stream, net::buffer(a->control), net::bind_executor(strand_, [a](error_code, std::size_t) {
      a->writing = false;
    }));
    SendCloseNotify(a);
  }

  template <class A>
  void SendCloseNotify(const std::shared_ptr<A>& a) {
    if constexpr (std::is_same_v<A, TlsAttempt>) a->stream.SendCloseNotify();
  }

  void OnReadError(error_code ec) {
    if (closing_) {
      // Our close handshake ended with the stream (or the socket died during it).
      return EndClosedByUs(CloseStatus());
    }
    Lost(absl::UnavailableError(absl::StrCat("upstream connection lost: ", ec.message())));
  }

  // --- Writing ------------------------------------------------------------------------

  // One frame in flight: a pong or ping first, then the queue's messages, then (closing)
  // our close frame.
  template <class A>
  void DoWrite(std::shared_ptr<A> a) {
    if (a->writing || !Current(a) || close_started_) return;
    if (a->pong_due || a->ping_due) {
      if (a->pong_due) {
        a->control = ws::ClientFrame(ws::Opcode::kPong, *a->pong_due, MaskKey());
        a->pong_due.reset();
      } else {
        a->control = ws::ClientFrame(ws::Opcode::kPing, {}, MaskKey());
        a->ping_due = false;
      }
      a->writing = true;
      net::async_write(a->stream, net::buffer(a->control),
                       net::bind_executor(strand_, [self = Self(), a](error_code ec, std::size_t) {
                         a->writing = false;
                         if (!self->Current(a)) return;
                         if (ec) return self->OnWriteError(ec);
                         self->DoWrite(a);
                       }));
      return;
    }
    if (queue_.empty()) {
      if (closing_) DoClose(a);
      return;
    }
    a->writing = true;
    // Several messages waiting (calls arriving together while a write was in flight):
    // they leave in one write, i.e. one send() and, over TLS, one record per 16 KiB,
    // instead of a system call, a record and a wake-up of the upstream each.
    if (queue_.size() > 1) return DoWriteBatch(a);
    a->batch = 1;
    std::array<net::const_buffer, 2> frame;
    Frame(queue_.front(), a->header.data(), frame.data());
    WriteData(a, frame);
  }

  // Writes `m`'s header into `header` and masks its payload in place (the payload is
  // ours: no copy); `out[0]`, `out[1]` become the frame's two buffers. Returns its size.
  static std::size_t Frame(Outgoing& m, char* header, net::const_buffer* out) {
    const uint32_t key = MaskKey();
    const std::size_t h = ws::WriteClientHeader(m.binary ? ws::Opcode::kBinary : ws::Opcode::kText, true,
                                                m.payload.size(), key, header);
    ws::ApplyMask(m.payload.data(), m.payload.size(), key);
    out[0] = net::buffer(header, h);
    out[1] = net::buffer(m.payload);
    return h + m.payload.size();
  }

  // Writes data frames; OnWrite follows on the strand. A plain socket is written at once
  // (it is non-blocking) and only what does not fit waits for the socket: an
  // asynchronous write that completes at once hands its completion to the io_context's
  // own queue, which woke the io thread for every request a gRPC thread wrote inline
  // (loop_executor.h), one context switch per call more than over TLS, whose stream
  // posts its completion to the strand.
  template <class A, class Buffers>
  void WriteData(std::shared_ptr<A> a, const Buffers& buffers) {
    auto done = [self = Self(), a](error_code ec, std::size_t = 0) { self->OnWrite(a, ec); };
    if constexpr (std::is_same_v<A, PlainAttempt>) {
      error_code ec;
      const std::size_t total = net::buffer_size(buffers);
      const std::size_t n = a->stream.write_some(buffers, ec);
      if (ec == net::error::would_block || ec == net::error::try_again) ec = {};
      if (ec || n == total) {
        net::post(strand_, [done = std::move(done), ec]() mutable { done(ec); });
        return;
      }
      beast::buffers_suffix<Buffers> rest(buffers);
      rest.consume(n);
      net::async_write(a->stream, rest, net::bind_executor(strand_, std::move(done)));
    } else {
      net::async_write(a->stream, buffers, net::bind_executor(strand_, std::move(done)));
    }
  }

  template <class A>
  void DoWriteBatch(std::shared_ptr<A> a) {
    if (a->gather == nullptr) a->gather = std::make_unique<WriteBatch>();
    WriteBatch& g = *a->gather;
    std::size_t n = 0;
    std::size_t bytes = 0;
    for (auto it = queue_.begin(); it != queue_.end() && n < WriteBatch::kMaxFrames &&
                                   bytes < WriteBatch::kMaxBytes;
         ++it, ++n) {
      bytes += Frame(*it, g.headers[n].data(), &g.buffers[2 * n]);
    }
    a->batch = static_cast<uint32_t>(n);
    WriteData(a, std::span<const net::const_buffer>(g.buffers.data(), 2 * n));
  }

  template <class A>
  void OnWrite(std::shared_ptr<A> a, error_code ec) {
    a->writing = false;
    if (!Current(a)) return;
    if (ec) return OnWriteError(ec);
    std::size_t bytes = 0;
    for (uint32_t i = 0; i < a->batch; ++i) {
      bytes += queue_.front().payload.size();
      queue_.pop_front();
    }
    stats_.frames_out.fetch_add(a->batch, std::memory_order_relaxed);
    stats_.bytes_out.fetch_add(bytes, std::memory_order_relaxed);
    queued_bytes_ -= bytes;
    a->batch = 0;
    if (want_writable_ && !closing_ && queue_.size() <= options_.send_queue_max_messages / 2 &&
        queued_bytes_ <= options_.send_queue_max_bytes / 2) {
      want_writable_ = false;
      if (!Notify([](ConnectionHandler& h) { h.OnWritable(); })) return;
      if (!Current(a)) return;
    }
    DoWrite(a);
  }

  void OnWriteError(error_code ec) {
    if (closing_) return EndClosedByUs(CloseStatus());
    Lost(absl::UnavailableError(absl::StrCat("writing to upstream failed: ", ec.message())));
  }

  // Our close frame, once everything queued before Close() has left. The connection
  // then reads on until the upstream answers with its own close frame (or the stream
  // ends, or close_timeout).
  template <class A>
  void DoClose(std::shared_ptr<A> a) {
    if (close_started_) return;
    close_started_ = true;
    a->writing = true;
    a->control = ws::ClientFrame(ws::Opcode::kClose, ws::ClosePayload(close_code_, close_text_), MaskKey());
    net::async_write(a->stream, net::buffer(a->control),
                     net::bind_executor(strand_, [self = Self(), a](error_code ec, std::size_t) {
                       a->writing = false;
                       if (!self->Current(a)) return;
                       // Nothing will read the answer while reads are paused.
                       if (ec || self->paused_) self->EndClosedByUs(self->CloseStatus());
                     }));
  }

  absl::Status CloseStatus() const {
    return absl::CancelledError(absl::StrCat("connection closed by the client (code ", close_code_, ")"));
  }

  // --- Keepalive ----------------------------------------------------------------------

  template <class A>
  void ArmKeepalive(std::shared_ptr<A> a) {
    const auto& ka = options_.keepalive;
    if (ka.ping_interval <= Duration::zero()) return;
    const Clock::time_point next =
        ping_sent_ ? *ping_sent_ + ka.pong_timeout : last_ping_ + ka.ping_interval;
    Arm(kKeepalive, next, a->gen);
  }

  template <class A>
  void OnKeepalive(std::shared_ptr<A> a) {
    if (!open_ || closing_) return;
    if (!handler_.lock()) return Shutdown();
    const auto& ka = options_.keepalive;
    const Clock::time_point now = Clock::now();
    if (ping_sent_ && a->last_rx >= *ping_sent_) ping_sent_.reset();
    if (paused_) {
      ping_sent_.reset();  // unread traffic is not silence
    } else if (ping_sent_ && now - *ping_sent_ >= ka.pong_timeout) {
      return Lost(absl::DeadlineExceededError(absl::StrCat(
          "no pong or other traffic from upstream within ", Fmt(ka.pong_timeout),
          " after a ping; the peer looks dead")));
    }
    if (!ping_sent_ && now - last_ping_ >= ka.ping_interval) {
      last_ping_ = now;
      if (!paused_) ping_sent_ = now;
      a->ping_due = true;
      if (!a->writing) DoWrite(a);
    }
    ArmKeepalive(a);
  }

  void ArmHeartbeat() { Arm(kHeartbeat, Later(options_.keepalive.heartbeat_interval), gen_); }

  // --- Timers -------------------------------------------------------------------------
  //
  // One timer serves every deadline of the connection (a handshake step's, the retry's,
  // keepalive, heartbeat, the healthy period, the close handshake): each is a slot with
  // its time and the generation it belongs to, and the timer waits for the earliest.
  // Seven timers cost ~0.8 KiB per connection and an idle one kept two or three waits
  // pending (~290 bytes each); now one wait at most (docs/performance.md, round 9).
  // Disarming is lazy: a wait that comes too early finds nothing due and waits again.

  enum Slot : uint8_t { kStep, kRetry, kKeepalive, kHeartbeat, kHealthy, kClose, kSlots };

  // Now + d, saturating (a configured duration may be very long).
  static Clock::time_point Later(Duration d) {
    const Clock::time_point now = Clock::now();
    const auto left = Clock::time_point::max() - now - std::chrono::seconds(1);
    return d >= left ? now + left : now + std::chrono::duration_cast<Clock::duration>(d);
  }

  void Arm(Slot slot, Clock::time_point at, uint64_t gen) {
    due_[slot] = at;
    due_gen_[slot] = gen;
    if (!waiting_ || at < waiting_until_) Wait(at);
  }

  void Disarm(Slot slot) {
    due_[slot] = Clock::time_point::max();
    // Nothing left: release the wait (and the connection it holds) now.
    if (waiting_ && *std::min_element(due_.begin(), due_.end()) == Clock::time_point::max()) {
      waiting_ = false;
      ++wait_seq_;
      timer_.cancel();
    }
  }

  void Wait(Clock::time_point at) {
    waiting_ = true;
    waiting_until_ = at;
    const uint64_t seq = ++wait_seq_;
    timer_.expires_at(at);  // cancels the wait it replaces (stale by its sequence)
    timer_.async_wait(Unbound([seq](ConnectionImpl& self, error_code) { self.OnTimer(seq); }));
  }

  void OnTimer(uint64_t seq) {
    if (seq != wait_seq_) return;
    waiting_ = false;
    for (int fired = 0; fired < 4 * kSlots; ++fired) {
      const auto it = std::min_element(due_.begin(), due_.end());
      if (*it > Clock::now()) break;
      const Slot slot = static_cast<Slot>(it - due_.begin());
      *it = Clock::time_point::max();
      Fire(slot, due_gen_[slot]);
    }
    // A slot fired above may have re-armed itself (Arm waits for it, since no wait was
    // pending) later than a slot still due before it: wait for the earliest.
    const Clock::time_point next = *std::min_element(due_.begin(), due_.end());
    if (next != Clock::time_point::max() && (!waiting_ || next < waiting_until_)) Wait(next);
  }

  void Fire(Slot slot, uint64_t gen) {
    switch (slot) {
      case kStep:
        // A handshake step's deadline: cancel what the attempt is waiting for.
        if (gen != gen_) return;
        if (resolver_) resolver_->cancel();
        WithAttempt([](auto& a) {
          a->timed_out = true;
          error_code ignored;
          a->socket().cancel(ignored);
        });
        return;
      case kRetry:
        if (gen == retry_gen_ && state_.load() == ConnectionState::kBackingOff) StartAttempt();
        return;
      case kKeepalive:
        if (gen == gen_) WithAttempt([&](auto& a) { OnKeepalive(a); });
        return;
      case kHeartbeat:
        if (gen != gen_ || state_.load() != ConnectionState::kReady || closing_) return;
        if (!Notify([](ConnectionHandler& h) { h.OnHeartbeat(); })) return;
        if (gen == gen_ && state_.load() == ConnectionState::kReady && !closing_) ArmHeartbeat();
        return;
      case kHealthy:
        if (gen != gen_ || state_.load() != ConnectionState::kReady) return;
        backoff_.Reset();
        auth_backoff_.Reset();
        return;
      case kClose:
        if (gen != gen_ || state_.load() == ConnectionState::kClosed) return;
        log::Warn(kLog, "close handshake timed out", {{"name", name_}, {"timeout", Fmt(options_.close_timeout)}});
        EndClosedByUs(absl::CancelledError("connection closed (close handshake timed out)"));
        return;
      case kSlots:
        return;
    }
  }

  // --- Failure and retry --------------------------------------------------------------

  void SetLastError(const absl::Status& st) {
    absl::MutexLock lock(&mu_);
    last_error_ = log::Redact(st.ToString());
  }

  static DisconnectInfo Info(absl::Status st) {
    DisconnectInfo info;
    info.reason = std::move(st);
    return info;
  }

  void FailAttempt(const absl::Status& st) { FailAttempt(Info(st)); }
  void FailAttempt(DisconnectInfo info) {
    log::Warn(kLog, "upstream connection attempt failed",
              {{"name", name_}, {"target", Target()}, {"error", log::Redact(info.reason.ToString())}});
    Teardown();
    Ended(std::move(info), /*classify=*/true);
  }

  void Lost(const absl::Status& st) {
    DisconnectInfo info = Info(st);
    info.was_open = true;
    Lost(std::move(info));
  }
  void Lost(DisconnectInfo info) {
    log::Warn(kLog, "upstream connection lost",
              {{"name", name_}, {"target", Target()}, {"error", log::Redact(info.reason.ToString())}});
    Teardown();
    Ended(std::move(info), /*classify=*/true);
  }

  // Close() ran its course (or timed out): closed for good, kClosedByUs.
  void EndClosedByUs(absl::Status st) {
    DisconnectInfo info = Info(std::move(st));
    info.kind = DisconnectKind::kClosedByUs;
    info.was_open = open_;
    Teardown();
    Finish(std::move(info));
  }

  // Drops the current attempt's socket; its pending operations complete as stale.
  void Teardown() {
    ++gen_;
    Disarm(kKeepalive);
    Disarm(kHeartbeat);
    Disarm(kHealthy);
    Disarm(kStep);
    if (resolver_) resolver_->cancel();
    error_code ignored;
    WithAttempt([&](auto& a) {
      a->socket().shutdown(tcp::socket::shutdown_both, ignored);
      a->socket().close(ignored);
    });
    plain_.reset();
    tls_.reset();
    open_ = false;
    close_started_ = false;
    queue_.clear();
    queued_bytes_ = 0;
    want_writable_ = false;
    ping_sent_.reset();
    stats_.ready_since_unix_ms.store(0);
  }

  // An attempt failed or the connection ended (the socket is already torn down).
  // Classifies the end unless the caller gave its kind, then schedules the next attempt
  // under that kind's policy, or finishes when reconnecting is off.
  void Ended(DisconnectInfo info, bool classify) {
    SetLastError(info.reason);
    std::shared_ptr<ConnectionHandler> h = handler_.lock();
    if (!h) return Shutdown();
    if (classify) {
      info.kind = DisconnectKind::kError;
      info.kind = h->Classify(info);
    }
    if (info.kind == DisconnectKind::kAuthRefused) stats_.auth_refusals.fetch_add(1);
    if (!options_.reconnect) {
      closing_ = true;
      h.reset();
      Finish(std::move(info));
      return;
    }
    const Duration delay = NextDelay(info);
    state_.store(ConnectionState::kBackingOff);
    stats_.retry_delay_ms.store(std::max<int64_t>(1, std::chrono::ceil<std::chrono::milliseconds>(delay).count()));
    Arm(kRetry, Later(delay), ++retry_gen_);
    log::Info(kLog, "upstream reconnect scheduled",
              {{"name", name_},
               {"kind", std::string(ToString(info.kind))},
               {"delay", Fmt(delay)},
               {"attempt", std::to_string(backoff_.attempt())}});
    h->OnDisconnected(info, true);
  }

  // The delay before the next attempt. The normal backoff advances on every failure,
  // whatever its kind, so refusals followed by plain errors keep backing off; only a
  // healthy period (MarkReady + backoff.reset_after) resets it and auth_backoff.
  Duration NextDelay(const DisconnectInfo& info) {
    const Duration normal = backoff_.Next();
    switch (info.kind) {
      case DisconnectKind::kAuthRefused:
        return auth_backoff_.Next();
      case DisconnectKind::kSlowDown:
        return std::max({normal, options_.slow_down_delay, std::min(info.retry_after, options_.max_retry_after)});
      default:
        return normal;
    }
  }

  // Closed for good.
  void Finish(DisconnectInfo info) {
    if (state_.load() == ConnectionState::kClosed) return;
    state_.store(ConnectionState::kClosed);
    stats_.retry_delay_ms.store(0);
    ++retry_gen_;
    Disarm(kClose);
    Disarm(kRetry);
    log::Info(kLog, "upstream connection closed", {{"name", name_}, {"kind", std::string(ToString(info.kind))}});
    if (auto h = handler_.lock()) h->OnDisconnected(info, false);
  }

  const Strand strand_;
  // Shared with the bridge's other connections; options_ refers to it.
  const std::shared_ptr<const ConnectionOptions> shared_options_;
  const ConnectionOptions& options_;
  const std::string name_;
  const std::weak_ptr<ConnectionHandler> handler_;
  Backoff backoff_;
  Backoff auth_backoff_;
  ConnectionStats stats_;
  std::atomic<ConnectionState> state_{ConnectionState::kIdle};

  mutable absl::Mutex mu_;
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  std::string target_ ABSL_GUARDED_BY(mu_);

  // Strand-only state.
  std::unique_ptr<tcp::resolver> resolver_;
  net::steady_timer timer_;
  std::array<Clock::time_point, kSlots> due_;  // max(): not armed
  std::array<uint64_t, kSlots> due_gen_{};      // gen_ (retry_gen_ for kRetry) when armed
  Clock::time_point waiting_until_{};
  uint64_t wait_seq_ = 0;  // identifies the timer's current wait
  bool waiting_ = false;
  uint64_t gen_ = 0;        // bumped per attempt and per teardown; stale handlers compare it
  uint64_t retry_gen_ = 0;  // identifies the pending retry timer
  // What the attempt dials and asks for; dropped once the connection is open (the next
  // attempt builds its own), so an open connection keeps neither.
  struct Dial {
    HandshakeRequest request;
    ParsedUrl url;
  };
  std::unique_ptr<Dial> dial_;
  std::shared_ptr<TlsClientContext> tls_ctx_;
  std::shared_ptr<PlainAttempt> plain_;
  std::shared_ptr<TlsAttempt> tls_;
  bool open_ = false;
  bool opened_before_ = false;
  bool closing_ = false;
  bool close_started_ = false;
  bool paused_ = false;
  uint16_t close_code_ = 1000;  // what Close() sends
  std::string close_text_;
  // A list, not a deque: libstdc++'s deque allocates ~580 bytes even when empty, and
  // this queue is empty for almost all of an idle session's life.
  std::list<Outgoing> queue_;
  size_t queued_bytes_ = 0;
  bool want_writable_ = false;
  std::optional<Clock::time_point> ping_sent_;
  Clock::time_point last_ping_{};
};

}  // namespace

std::shared_ptr<Connection> Connection::Create(Strand strand, ConnectionOptions options,
                                               std::weak_ptr<ConnectionHandler> handler) {
  std::string name = options.name;
  return Create(std::move(strand), std::make_shared<const ConnectionOptions>(std::move(options)),
                std::move(name), std::move(handler));
}

std::shared_ptr<Connection> Connection::Create(Strand strand,
                                               std::shared_ptr<const ConnectionOptions> options,
                                               std::string name,
                                               std::weak_ptr<ConnectionHandler> handler) {
  return std::make_shared<ConnectionImpl>(std::move(strand), std::move(options), std::move(name),
                                          std::move(handler));
}

}  // namespace wsbridge::core
