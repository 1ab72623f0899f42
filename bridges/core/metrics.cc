#include "bridges/core/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace wsbridge::core {
namespace {

void AppendEscaped(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out.push_back(c);
  }
}

std::string FormatDouble(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// `{a="x"}` + extra label (le) merged into one brace set.
std::string WithLabel(const std::string& rendered, std::string_view key, std::string_view value) {
  std::string extra(key);
  extra += "=\"";
  AppendEscaped(extra, value);
  extra += "\"";
  if (rendered.empty()) return "{" + extra + "}";
  return rendered.substr(0, rendered.size() - 1) + "," + extra + "}";
}

}  // namespace

std::string RenderLabels(const Labels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) out.push_back(',');
    first = false;
    out += k;
    out += "=\"";
    AppendEscaped(out, v);
    out += "\"";
  }
  out += "}";
  return out;
}

std::vector<double> LatencyBuckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
          0.025,   0.05,   0.1,     0.25,   0.5,   1,      2.5,    5,     10};
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  std::sort(bounds_.begin(), bounds_.end());
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double seconds) {
  size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), seconds) - bounds_.begin();
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  if (seconds > 0) {
    sum_nanos_.fetch_add(static_cast<uint64_t>(seconds * 1e9), std::memory_order_relaxed);
  }
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    out[i] = total;
  }
  return out;
}

double Histogram::sum() const { return sum_nanos_.load(std::memory_order_relaxed) / 1e9; }

uint64_t Histogram::count() const { return CumulativeCounts().back(); }

MetricsRegistry::Family& MetricsRegistry::FamilyLocked(std::string_view name, std::string_view help,
                                                        std::string_view type) {
  auto it = families_.find(name);
  if (it == families_.end()) {
    it = families_.emplace(std::string(name), Family{std::string(help), std::string(type), {}, {}, {}}).first;
  }
  return it->second;
}

Counter& MetricsRegistry::GetCounter(std::string_view name, std::string_view help, const Labels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyLocked(name, help, "counter").counters[RenderLabels(labels)];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Gauge& MetricsRegistry::GetGauge(std::string_view name, std::string_view help, const Labels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyLocked(name, help, "gauge").gauges[RenderLabels(labels)];
  if (!slot) slot = std::make_unique<Gauge>();
  return *slot;
}

Histogram& MetricsRegistry::GetHistogram(std::string_view name, std::string_view help, const Labels& labels,
                                         std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyLocked(name, help, "histogram").histograms[RenderLabels(labels)];
  if (!slot) slot = std::make_unique<Histogram>(std::move(bounds));
  return *slot;
}

void MetricsRegistry::AddCollector(Collector c) {
  absl::MutexLock lock(&mu_);
  collectors_.push_back(std::move(c));
}

std::string MetricsRegistry::Render() const {
  std::string out;
  std::vector<Collector> collectors;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, f] : families_) {
      out += "# HELP " + name + " " + f.help + "\n";
      out += "# TYPE " + name + " " + f.type + "\n";
      for (const auto& [labels, c] : f.counters) {
        out += name + labels + " " + std::to_string(c->value()) + "\n";
      }
      for (const auto& [labels, g] : f.gauges) {
        out += name + labels + " " + std::to_string(g->value()) + "\n";
      }
      for (const auto& [labels, h] : f.histograms) {
        auto counts = h->CumulativeCounts();
        for (size_t i = 0; i < h->bounds().size(); ++i) {
          out += name + "_bucket" + WithLabel(labels, "le", FormatDouble(h->bounds()[i])) + " " +
                 std::to_string(counts[i]) + "\n";
        }
        out += name + "_bucket" + WithLabel(labels, "le", "+Inf") + " " + std::to_string(counts.back()) + "\n";
        out += name + "_sum" + labels + " " + FormatDouble(h->sum()) + "\n";
        out += name + "_count" + labels + " " + std::to_string(counts.back()) + "\n";
      }
    }
    collectors = collectors_;
  }
  // Collectors run outside the lock: they may read other components' state.
  for (const auto& c : collectors) c(out);
  return out;
}

}  // namespace wsbridge::core
