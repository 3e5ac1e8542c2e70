// CPU kernels: every row's groups through the shared math, one function per
// dtype x bits x group size. This file is compiled once per instruction set
// (CMakeLists.txt): the platform baseline as pyfuse::cpu_base, and on
// x86-64 also pyfuse::cpu_avx2 and pyfuse::cpu_avx512 (AVX-512 brings FMA
// instructions; -ffp-contract=off keeps every rounding all the same).
#include "csrc/fuse_cpu.h"

#include <stdexcept>

#ifndef PYFUSE_CPU_ISA
#define PYFUSE_CPU_ISA cpu_base
#endif

namespace pyfuse {
namespace PYFUSE_CPU_ISA {

namespace {

template <typename T, int bits, int group_size, bool MetalRounding>
void fuse_rows(const FuseParams& p, const CpuBuffers& buf, float* row_k, size_t row0, size_t row1) {
  auto s_in = static_cast<const T*>(buf.scales_in);
  auto b_in = static_cast<const T*>(buf.biases_in);
  auto s_out = static_cast<T*>(buf.scales_out);
  auto b_out = static_cast<T*>(buf.biases_out);
  for (size_t row = row0; row < row1; ++row) {
    if (p.has_k) {
      row_k[row] = row_factor_at<T, bits, group_size>(
          p, uint32_t(row), buf.w_in, s_in, b_in, buf.a, buf.b, buf.magnitude);
    }
    for (int g = 0; g < p.groups_per_row; ++g) {
      fuse_group_at<T, bits, group_size, MetalRounding>(
          p, uint32_t(row), uint32_t(g), buf.w_in, s_in, b_in, buf.a, buf.b, row_k,
          buf.w_out, s_out, b_out);
    }
  }
}

template <typename T, bool MetalRounding>
RowsFn select_typed(int bits, int group_size) {
#define PYFUSE_CASE(B, G) \
  if (bits == B && group_size == G) return &fuse_rows<T, B, G, MetalRounding>;
#define PYFUSE_CASES(B) PYFUSE_CASE(B, 32) PYFUSE_CASE(B, 64) PYFUSE_CASE(B, 128)
  PYFUSE_CASES(2)
  PYFUSE_CASES(3)
  PYFUSE_CASES(4)
  PYFUSE_CASES(5)
  PYFUSE_CASES(6)
  PYFUSE_CASES(8)
#undef PYFUSE_CASES
#undef PYFUSE_CASE
  throw std::invalid_argument("[pyfuse.fuse_requant] unsupported bits/group_size");
}

template <bool MetalRounding>
RowsFn select_rounding(mlx::core::Dtype dtype, int bits, int group_size) {
  if (dtype == mlx::core::float32) return select_typed<float, MetalRounding>(bits, group_size);
  if (dtype == mlx::core::float16) return select_typed<mlx::core::float16_t, MetalRounding>(bits, group_size);
  return select_typed<mlx::core::bfloat16_t, MetalRounding>(bits, group_size);
}

} // namespace

RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding) {
  return metal_rounding ? select_rounding<true>(dtype, bits, group_size)
                        : select_rounding<false>(dtype, bits, group_size);
}

} // namespace PYFUSE_CPU_ISA
} // namespace pyfuse
