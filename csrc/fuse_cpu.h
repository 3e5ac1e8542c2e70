// The CPU kernels of FuseRequant, compiled once per instruction set
// (csrc/fuse_cpu.cpp; see CMakeLists.txt) and chosen at run time
// (csrc/cpu_isa.cpp), so that one wheel runs on every x86-64 and still uses
// AVX2 or AVX-512 where they exist.
#pragma once

#include <cstddef>
#include <cstdint>

#include "csrc/fuse_math.h"
#include "mlx/dtype.h"

namespace pyfuse {

// Fuses rows [row0, row1); `row_k` receives the DoRA factors of those rows.
using RowsFn = void (*)(const FuseParams&, const CpuBuffers&, float* row_k, size_t row0, size_t row1);

// The calibrated policy's rows (csrc/fuse_calibrated.cpp, one build: its
// time goes into the error push, which every build vectorizes alike).
RowsFn select_calibrated_rows_fn(mlx::core::Dtype dtype, int bits, int group_size);

// The CPU kernel builds, narrowest first: X(namespace, name, runs_here)
// with `runs_here` the run-time test that this processor (and its OS) runs
// the build (__builtin_cpu_supports also checks that the OS saves the
// vector registers). Each is csrc/fuse_cpu.cpp compiled into `namespace`
// with the flags CMakeLists.txt gives it (PYFUSE_CPU_BUILDS there: keep the
// two lists alike). Only x86-64 has more than the platform baseline; arm64
// (a Mac's CPU) has NEON in its baseline.
#if defined(PYFUSE_HAVE_X86_KERNELS)
#define PYFUSE_FOR_EACH_CPU_BUILD(X)                                                       \
  X(cpu_base, "baseline", true)                                                            \
  X(cpu_avx2, "avx2", __builtin_cpu_supports("avx2"))                                      \
  X(cpu_avx512, "avx512",                                                                  \
    __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&             \
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
#else
#define PYFUSE_FOR_EACH_CPU_BUILD(X) X(cpu_base, "baseline", true)
#endif

#define PYFUSE_DECLARE_CPU_BUILD(ns, name, runs_here) \
  namespace ns {                                      \
  RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding); \
  }
PYFUSE_FOR_EACH_CPU_BUILD(PYFUSE_DECLARE_CPU_BUILD)
#undef PYFUSE_DECLARE_CPU_BUILD

} // namespace pyfuse
