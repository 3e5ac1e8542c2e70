// Run-time choice among the CPU kernel builds (see cpu_isa.h).
#include "csrc/cpu_isa.h"

#include <atomic>
#include <stdexcept>

namespace pyfuse {

namespace {

struct KernelBuild {
  const char* name;
  bool (*supported)();
  RowsFn (*select)(mlx::core::Dtype, int, int, bool);
};

// The builds of csrc/fuse_cpu.h, narrowest first.
const KernelBuild kBuilds[] = {
#define PYFUSE_CPU_BUILD_ENTRY(ns, name, runs_here) \
  {name, [] { return bool(runs_here); }, &ns::select_rows_fn},
    PYFUSE_FOR_EACH_CPU_BUILD(PYFUSE_CPU_BUILD_ENTRY)
#undef PYFUSE_CPU_BUILD_ENTRY
};
constexpr int kNumBuilds = sizeof(kBuilds) / sizeof(kBuilds[0]);

// -1: automatic (the widest supported).
std::atomic<int> forced{-1};

int widest() {
  static const int index = [] {
    int best = 0;
    for (int i = 0; i < kNumBuilds; ++i) {
      if (kBuilds[i].supported()) best = i;
    }
    return best;
  }();
  return index;
}

int active() {
  int f = forced.load();
  return f >= 0 ? f : widest();
}

} // namespace

std::vector<std::string> available_cpu_kernels() {
  std::vector<std::string> names;
  for (const auto& build : kBuilds) {
    if (build.supported()) names.push_back(build.name);
  }
  return names;
}

std::string active_cpu_kernels() {
  return kBuilds[active()].name;
}

void set_cpu_kernels(const std::string& name) {
  if (name == "auto") {
    forced.store(-1);
    return;
  }
  std::string names;
  for (int i = 0; i < kNumBuilds; ++i) {
    if (!kBuilds[i].supported()) continue;
    if (name == kBuilds[i].name) {
      forced.store(i);
      return;
    }
    names += std::string(names.empty() ? "" : ", ") + kBuilds[i].name;
  }
  throw std::invalid_argument(
      "[pyfuse._ext.set_cpu_kernels] '" + name + "' is not available here; supported: auto, " + names);
}

RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding) {
  return kBuilds[active()].select(dtype, bits, group_size, metal_rounding);
}

} // namespace pyfuse
