#include "bridges/core/bridge.h"
#include "bridges/dfx/factory.h"

namespace wsbridge::core {

void RegisterBuiltinBridges(BridgeRegistry& registry) {
  dfx::RegisterFactory(registry);
}

}  // namespace wsbridge::core
