// HttpClient: one-shot HTTP/1.1 requests (http:// and https://) for the REST endpoints
// some upstreams have beside their WebSocket (a login that returns a token, creating a
// resource). Asynchronous on an executor, with the TLS settings of the upstream's
// WebSocket connection (CA file, SNI / server name, peer verification, client
// certificate), one deadline over the whole exchange (resolve, connect, TLS, write,
// read) and a bound on the answer's size.
//
// Every request uses a fresh connection ("Connection: close"): the endpoints it serves
// (logins, creates) are rare, so keeping connections alive is not worth its state.
//
// Secrets: request bodies and headers (passwords, Authorization) are never logged or
// quoted in errors; URLs in messages go through log::RedactUrl.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/connection.h"

namespace boost::asio::ssl {
class context;
}

namespace wsbridge::core {

struct HttpClientOptions {
  std::string name;              // for logs and messages, e.g. "nexora"
  bool allow_plaintext = false;  // http:// allowed (local emulators and tests only)
  TlsOptions tls;                // as for the WebSocket (see connection.h)
  Duration timeout = std::chrono::seconds(30);  // whole exchange, unless the request sets one
  size_t max_response_bytes = 1 << 20;          // body; headers are bounded at 16 KiB
};

struct HttpRequestSpec {
  std::string method = "POST";
  std::string url;  // http(s)://host[:port]/path?query
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  std::string content_type = "application/json";  // sent when body is not empty
  Duration timeout = Duration::zero();            // zero: HttpClientOptions::timeout
};

struct HttpAnswer {
  int status = 0;
  std::string body;
  std::string content_type;
};

// Thread-safe; requests run concurrently, each on its own strand.
class HttpClient : public std::enable_shared_from_this<HttpClient> {
 public:
  using Callback = std::function<void(absl::StatusOr<HttpAnswer>)>;

  static std::shared_ptr<HttpClient> Create(boost::asio::any_io_executor executor,
                                            HttpClientOptions options);
  ~HttpClient();

  // Sends `request`; `done` runs once, on an io thread (it must not block), with the
  // answer (any HTTP status: a 4xx/5xx is an answer, not an error) or an error:
  // INVALID_ARGUMENT (bad URL), FAILED_PRECONDITION (http:// without allow_plaintext, TLS
  // material that cannot be loaded), UNAVAILABLE (resolve, connect, TLS or I/O failure),
  // DEADLINE_EXCEEDED (the timeout passed), RESOURCE_EXHAUSTED (the answer is larger
  // than max_response_bytes).
  void Send(HttpRequestSpec request, Callback done);

  // POST `json_body` (JSON text) with Content-Type and Accept application/json.
  void PostJson(std::string url, std::string json_body,
                std::vector<std::pair<std::string, std::string>> headers, Callback done);

  const HttpClientOptions& options() const { return options_; }

 private:
  HttpClient(boost::asio::any_io_executor executor, HttpClientOptions options);
  // The TLS context, made on first use and kept.
  absl::StatusOr<std::shared_ptr<boost::asio::ssl::context>> TlsContext();

  boost::asio::any_io_executor executor_;
  const HttpClientOptions options_;
  absl::Mutex mu_;
  std::shared_ptr<boost::asio::ssl::context> tls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace wsbridge::core
