// The admin HTTP listener: GET /metrics (Prometheus text), /healthz (liveness),
// /readyz (readiness). Small on purpose: one request at a time per connection, header
// and body limits, an idle/read timeout, GET only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/any_io_executor.hpp>

#include "absl/status/statusor.h"

namespace wsbridge::daemon {

struct AdminHttpHandlers {
  // Prometheus text for /metrics.
  std::function<std::string()> metrics;
  // Readiness for /readyz: 200 when true, else 503 with the reason.
  std::function<bool(std::string& reason)> ready;
};

class AdminHttpServer {
 public:
  virtual ~AdminHttpServer() = default;
  virtual uint16_t port() const = 0;
  // "host:port" actually bound.
  virtual std::string address() const = 0;
  // Stops accepting and closes open connections. Thread-safe, idempotent.
  virtual void Stop() = 0;
};

// Binds `listen` ("host:port", port may be 0) and starts accepting on `executor`.
absl::StatusOr<std::unique_ptr<AdminHttpServer>> StartAdminHttpServer(
    boost::asio::any_io_executor executor, std::string_view listen, AdminHttpHandlers handlers);

}  // namespace wsbridge::daemon
