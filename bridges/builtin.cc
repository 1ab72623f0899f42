#include "bridges/core/bridge.h"
#include "bridges/dfx/factory.h"
#include "bridges/emogg/factory.h"
#include "bridges/nexora/factory.h"
#include "bridges/nlx/factory.h"

namespace wsbridge::core {

void RegisterBuiltinBridges(BridgeRegistry& registry) {
  dfx::RegisterFactory(registry);
  emogg::RegisterFactory(registry);
  nexora::RegisterFactory(registry);
  nlx::RegisterFactory(registry);
}

}  // namespace wsbridge::core
