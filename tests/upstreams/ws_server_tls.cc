// The test server's TLS connections (see ws_server_session.h).
#include "tests/upstreams/ws_server_session.h"

namespace wsbridge::upstreams {

std::shared_ptr<WsServer::Impl::SessionBase> WsServer::Impl::MakeTlsSession(
    Impl* core, tcp::socket socket, uint64_t id) {
  auto s = std::make_shared<Session<true>>(core, std::move(socket), id);
  s->Attach();
  return s;
}

}  // namespace wsbridge::upstreams
