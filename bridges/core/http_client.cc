#include "bridges/core/http_client.h"

#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <optional>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/url.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kLog = "http";
constexpr uint32_t kMaxHeaderBytes = 16 << 10;



bool IsIpLiteral(const std::string& host) {
  error_code ec;
  asio::ip::make_address(host, ec);
  return !ec;
}

// One request/answer exchange over its own connection, on its own strand. Every step
// runs under the one deadline: the timer cancels the resolver and closes the socket.
template <typename Stream>
class Exchange : public std::enable_shared_from_this<Exchange<Stream>> {
 public:
  using Strand = asio::strand<asio::any_io_executor>;

  template <typename... Args>
  Exchange(Strand strand, ParsedUrl url, std::string what, http::request<http::string_body> req,
           size_t max_body, Clock::time_point deadline, HttpClient::Callback done, Args&&... args)
      : strand_(strand),
        stream_(strand, std::forward<Args>(args)...),
        resolver_(strand),
        timer_(strand),
        url_(std::move(url)),
        what_(std::move(what)),
        req_(std::move(req)),
        deadline_(deadline),
        done_(std::move(done)) {
    parser_.body_limit(max_body);
    parser_.header_limit(kMaxHeaderBytes);
    max_body_ = max_body;
  }

  Stream& stream() { return stream_; }

  // `prepare` (e.g. SNI and host checks on the TLS stream) runs first; its error ends
  // the exchange before any I/O.
  void Start(std::function<absl::Status(Stream&)> prepare) {
    auto self = this->shared_from_this();
    asio::post(strand_, [self, prepare = std::move(prepare)] {
      if (prepare) {
        if (absl::Status st = prepare(self->stream_); !st.ok()) return self->Finish(st);
      }
      self->timer_.expires_at(self->deadline_);
      self->timer_.async_wait([self](error_code ec) {
        if (ec) return;  // cancelled: the exchange ended first
        self->timed_out_ = true;
        self->resolver_.cancel();
        beast::get_lowest_layer(self->stream_).cancel();
        beast::get_lowest_layer(self->stream_).close();
      });
      self->resolver_.async_resolve(
          self->url_.host, self->url_.port,
          [self](error_code ec, const tcp::resolver::results_type& results) {
            self->OnResolve(ec, results);
          });
    });
  }

 private:
  void OnResolve(error_code ec, const tcp::resolver::results_type& results) {
    if (ec) return Fail("resolving the host", ec);
    auto self = this->shared_from_this();
    beast::get_lowest_layer(stream_).async_connect(
        results, [self](error_code ec, const tcp::endpoint&) { self->OnConnect(ec); });
  }

  void OnConnect(error_code ec) {
    if (ec) return Fail("connecting", ec);
    error_code ignored;
    beast::get_lowest_layer(stream_).socket().set_option(tcp::no_delay(true), ignored);
    auto self = this->shared_from_this();
    if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
      stream_.async_handshake(ssl::stream_base::client,
                              [self](error_code ec) { self->OnHandshake(ec); });
    } else {
      Write();
    }
  }

  void OnHandshake(error_code ec) {
    if (ec) return Fail("the TLS handshake", ec);
    Write();
  }

  void Write() {
    auto self = this->shared_from_this();
    http::async_write(stream_, req_, [self](error_code ec, size_t) {
      if (ec) return self->Fail("sending the request", ec);
      http::async_read(self->stream_, self->buffer_, self->parser_,
                       [self](error_code ec, size_t) { self->OnRead(ec); });
    });
  }

  void OnRead(error_code ec) {
    if (ec == http::error::body_limit) {
      return Finish(absl::ResourceExhaustedError(absl::StrCat(
          what_, ": the answer is larger than ", max_body_, " bytes; refused")));
    }
    if (ec == http::error::header_limit) {
      return Finish(absl::ResourceExhaustedError(
          absl::StrCat(what_, ": the answer's headers exceed ", kMaxHeaderBytes, " bytes; refused")));
    }
    if (ec) return Fail("reading the answer", ec);
    http::response<http::string_body> res = parser_.release();
    HttpAnswer answer;
    answer.status = static_cast<int>(res.result_int());
    answer.body = std::move(res.body());
    if (auto it = res.find(http::field::content_type); it != res.end()) {
      answer.content_type = std::string(it->value());
    }
    Finish(std::move(answer));
  }

  void Fail(std::string_view step, error_code ec) {
    if (timed_out_) {
      return Finish(absl::DeadlineExceededError(
          absl::StrCat(what_, ": no answer within ", absl::FormatDuration(absl::FromChrono(timeout_)),
                       " (stopped while ", Av(step), ")")));
    }
    std::string detail = ec.message();
    if (ec.category() == asio::error::get_ssl_category()) {
      // OpenSSL's reason ("certificate verify failed") says more than the category.
      detail = absl::StrCat(ec.message(), " (check the TLS settings: ca_file, server_name)");
    }
    Finish(absl::UnavailableError(absl::StrCat(what_, ": ", Av(step), " failed: ", detail)));
  }

  void Finish(absl::StatusOr<HttpAnswer> result) {
    if (finished_) return;
    finished_ = true;
    timer_.cancel();
    error_code ignored;
    beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ignored);
    beast::get_lowest_layer(stream_).close();
    if (!result.ok()) {
      log::Debug(kLog, "request failed", {{"request", what_}, {"error", log::Redact(result.status().ToString())}});
    }
    HttpClient::Callback done = std::move(done_);
    done(std::move(result));
  }

 public:
  Duration timeout_ = Duration::zero();
  std::shared_ptr<ssl::context> tls_context_;  // outlives the stream that uses it

 private:
  Strand strand_;
  Stream stream_;
  tcp::resolver resolver_;
  asio::steady_timer timer_;
  ParsedUrl url_;
  std::string what_;
  http::request<http::string_body> req_;
  Clock::time_point deadline_;
  HttpClient::Callback done_;
  beast::flat_buffer buffer_;
  http::response_parser<http::string_body> parser_;
  size_t max_body_ = 0;
  bool timed_out_ = false;
  bool finished_ = false;
};

}  // namespace

std::shared_ptr<HttpClient> HttpClient::Create(asio::any_io_executor executor,
                                               HttpClientOptions options) {
  return std::shared_ptr<HttpClient>(new HttpClient(std::move(executor), std::move(options)));
}

HttpClient::HttpClient(asio::any_io_executor executor, HttpClientOptions options)
    : executor_(std::move(executor)), options_(std::move(options)) {}

HttpClient::~HttpClient() = default;

absl::StatusOr<std::shared_ptr<ssl::context>> HttpClient::TlsContext() {
  absl::MutexLock lock(&mu_);
  if (tls_ != nullptr) return tls_;
  // The same context settings as the WebSocket connection (connection.cc).
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
  SSL_CTX* native = ctx->native_handle();
  SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION);
  SSL_CTX_set_options(native, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  const TlsOptions& o = options_.tls;
  error_code ec;
  if (o.verify_peer) {
    ctx->set_verify_mode(ssl::verify_peer, ec);
    if (o.ca_file.empty()) {
      ctx->set_default_verify_paths(ec);
      if (ec) {
        return absl::FailedPreconditionError(
            absl::StrCat("loading the system trust store: ", ec.message()));
      }
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
  tls_ = ctx;
  return tls_;
}

void HttpClient::PostJson(std::string url, std::string json_body,
                          std::vector<std::pair<std::string, std::string>> headers, Callback done) {
  HttpRequestSpec r;
  r.method = "POST";
  r.url = std::move(url);
  r.body = std::move(json_body);
  r.headers = std::move(headers);
  r.headers.emplace_back("Accept", "application/json");
  Send(std::move(r), std::move(done));
}

void HttpClient::Send(HttpRequestSpec spec, Callback done) {
  // Errors before any I/O are reported on the executor too: callers see one contract.
  auto fail = [this, &done](absl::Status st) {
    asio::post(executor_, [done = std::move(done), st = std::move(st)] { done(st); });
  };
  const std::string what = absl::StrCat(spec.method, " ", log::RedactUrl(spec.url));
  absl::StatusOr<ParsedUrl> url = ParseUrl(spec.url, "https", "http", "URL");
  if (!url.ok()) return fail(url.status());
  if (!url->tls && !options_.allow_plaintext) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        what, ": refusing plaintext http:// for ", options_.name,
        " (use https://, or allow_plaintext only for local emulators and tests)")));
  }
  http::verb verb = http::string_to_verb(spec.method);
  if (verb == http::verb::unknown) {
    return fail(absl::InvalidArgumentError(absl::StrCat("unknown HTTP method \"", spec.method, "\"")));
  }
  http::request<http::string_body> req{verb, url->target, 11};
  req.set(http::field::host, url->host_header);
  req.set(http::field::user_agent, "wsbridge");
  req.set(http::field::connection, "close");
  for (const auto& [k, v] : spec.headers) {
    if (k.find_first_of("\r\n:") != std::string::npos || v.find_first_of("\r\n") != std::string::npos) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(what, ": header \"", k, "\" has a line break or colon in it")));
    }
    req.set(k, v);
  }
  if (!spec.body.empty()) req.set(http::field::content_type, spec.content_type);
  req.body() = std::move(spec.body);
  req.prepare_payload();

  const Duration timeout = spec.timeout > Duration::zero() ? spec.timeout : options_.timeout;
  const Clock::time_point deadline = Clock::now() + timeout;
  auto strand = asio::make_strand(executor_);
  if (!url->tls) {
    auto x = std::make_shared<Exchange<beast::tcp_stream>>(
        strand, *std::move(url), what, std::move(req), options_.max_response_bytes, deadline,
        std::move(done));
    x->timeout_ = timeout;
    x->Start(nullptr);
    return;
  }
  absl::StatusOr<std::shared_ptr<ssl::context>> ctx = TlsContext();
  if (!ctx.ok()) return fail(absl::Status(ctx.status().code(), absl::StrCat(what, ": ", ctx.status().message())));
  std::string name = options_.tls.server_name.empty() ? url->host : options_.tls.server_name;
  const bool verify = options_.tls.verify_peer;
  using TlsStream = beast::ssl_stream<beast::tcp_stream>;
  auto x = std::make_shared<Exchange<TlsStream>>(strand, *std::move(url), what, std::move(req),
                                                 options_.max_response_bytes, deadline,
                                                 std::move(done), **ctx);
  x->timeout_ = timeout;
  x->tls_context_ = *ctx;
  x->Start([name = std::move(name), verify](TlsStream& stream) -> absl::Status {
    SSL* native = stream.native_handle();
    if (native == nullptr) return absl::ResourceExhaustedError("cannot create a TLS session");
    const bool ip = IsIpLiteral(name);
    // SNI carries host names only; an IP literal is not allowed there (RFC 6066).
    if (!ip && SSL_set_tlsext_host_name(native, name.c_str()) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("bad TLS server name \"", name, "\""));
    }
    if (verify) {
      const int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(native), name.c_str())
                        : SSL_set1_host(native, name.c_str());
      if (ok != 1) return absl::InvalidArgumentError(absl::StrCat("bad TLS server name \"", name, "\""));
    }
    return absl::OkStatus();
  });
}

}  // namespace wsbridge::core
