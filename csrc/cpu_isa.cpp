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

// Narrowest first. __builtin_cpu_supports also checks that the OS saves
// the vector registers (XGETBV), not only the CPUID bits.
const KernelBuild kBuilds[] = {
    {"baseline", [] { return true; }, &cpu_base::select_rows_fn},
#if defined(PYFUSE_HAVE_X86_KERNELS)
    {"avx2", [] { return bool(__builtin_cpu_supports("avx2")); }, &cpu_avx2::select_rows_fn},
    {"avx512",
     [] {
       return bool(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"));
     },
     &cpu_avx512::select_rows_fn},
#endif
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
      "[pyfuse.set_cpu_kernels] '" + name + "' is not available here; supported: auto, " + names);
}

RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding) {
  return kBuilds[active()].select(dtype, bits, group_size, metal_rounding);
}

} // namespace pyfuse
