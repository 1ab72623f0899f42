// The test server's plain connections (see ws_server_session.h).
#include "tests/upstreams/ws_server_session.h"

namespace wsbridge::upstreams {

std::shared_ptr<WsServer::Impl::SessionBase> WsServer::Impl::MakePlainSession(
    Impl* core, tcp::socket socket, uint64_t id) {
  auto s = std::make_shared<Session<false>>(core, std::move(socket), id);
  s->Attach();
  return s;
}

}  // namespace wsbridge::upstreams
