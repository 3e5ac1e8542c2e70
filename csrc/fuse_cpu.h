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

struct CpuBuffers {
  const uint32_t* w_in;
  const void* scales_in;
  const void* biases_in;
  const float* a;
  const float* b;
  const float* magnitude;  // nullptr without DoRA
  uint32_t* w_out;
  void* scales_out;
  void* biases_out;
  const float* prop = nullptr;  // calibrated: P [E, in, in]; nullptr: plain rounding
};

// Fuses rows [row0, row1); `row_k` receives the DoRA factors of those rows.
using RowsFn = void (*)(const FuseParams&, const CpuBuffers&, float* row_k, size_t row0, size_t row1);

// The calibrated policy's rows (csrc/fuse_calibrated.cpp, one build: its
// time goes into the error push, which every build vectorizes alike).
RowsFn select_calibrated_rows_fn(mlx::core::Dtype dtype, int bits, int group_size);

namespace cpu_base {
RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding);
}
namespace cpu_avx2 {
RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding);
}
namespace cpu_avx512 {
RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding);
}

} // namespace pyfuse
