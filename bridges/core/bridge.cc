#include "bridges/core/bridge.h"

namespace wsbridge::core {

BridgeRegistry& BridgeRegistry::Global() {
  static auto* registry = new BridgeRegistry();
  return *registry;
}

void BridgeRegistry::Register(std::string config_type, BridgeFactory factory) {
  absl::MutexLock lock(&mu_);
  factories_[std::move(config_type)] = std::move(factory);
}

const BridgeFactory* BridgeRegistry::Find(std::string_view config_type) const {
  absl::MutexLock lock(&mu_);
  auto it = factories_.find(config_type);
  // Entries are never removed, so the pointer stays valid after the lock is released.
  return it == factories_.end() ? nullptr : &it->second;
}

std::vector<std::string> BridgeRegistry::Types() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& [type, factory] : factories_) out.push_back(type);
  return out;
}

ActiveCalls::Id ActiveCalls::Add(std::function<void(const grpc::Status&)> abort) {
  absl::MutexLock lock(&mu_);
  if (closed_) return 0;
  Id id = next_++;
  calls_.emplace(id, std::move(abort));
  return id;
}

void ActiveCalls::Remove(Id id) {
  absl::MutexLock lock(&mu_);
  calls_.erase(id);
}

void ActiveCalls::AbortAll(const grpc::Status& status) {
  std::map<Id, std::function<void(const grpc::Status&)>> calls;
  {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    calls.swap(calls_);
  }
  // Outside the lock: an abort may finish the call, whose OnDone calls Remove().
  for (auto& [id, abort] : calls) abort(status);
}

size_t ActiveCalls::size() const {
  absl::MutexLock lock(&mu_);
  return calls_.size();
}

}  // namespace wsbridge::core
