#include "bridges/core/bridge.h"
#include "bridges/dfx/factory.h"
#include "bridges/emogg/factory.h"
#include "bridges/nexora/factory.h"

namespace wsbridge::core {

void RegisterBuiltinBridges(BridgeRegistry& registry) {
  dfx::RegisterFactory(registry);
  emogg::RegisterFactory(registry);
  nexora::RegisterFactory(registry);
}

}  // namespace wsbridge::core
