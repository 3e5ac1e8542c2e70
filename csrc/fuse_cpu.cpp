// CPU kernels: every row's groups through the shared math, one function per
// dtype x bits x group size. This file is compiled once per instruction set
// (the builds of PYFUSE_FOR_EACH_CPU_BUILD in csrc/fuse_cpu.h, with the
// flags CMakeLists.txt gives each), into the namespace PYFUSE_CPU_ISA names
// (AVX-512 brings FMA instructions; -ffp-contract=off keeps every rounding
// all the same).
#include "csrc/fuse_cpu.h"

#include <stdexcept>

#ifndef PYFUSE_CPU_ISA
#define PYFUSE_CPU_ISA cpu_base
#endif

namespace pyfuse {
namespace PYFUSE_CPU_ISA {

namespace {

// How many groups of a row the stock policy fuses together (below).
constexpr int kStockBatch = 4;

// Stock-fuses groups g .. g + kStockBatch - 1 of a row: first every
// group's values and fit, then every group's codes. Each fit ends in a
// chain of dependent divisions that the next groups' work overlaps; one
// group after the other left the core waiting (4 groups: 15-35 % faster
// per weight than 1, on AVX2 and AVX-512 alike).
template <typename T, int bits, int group_size, bool MetalRounding>
void fuse_stock_batch_at(const FuseParams& p, uint32_t row, uint32_t g, const CpuBuffers& buf,
                         const float* row_k) {
  constexpr int N = kStockBatch;
  constexpr int words_per_group = group_size * bits / 32;
  auto s_in = static_cast<const T*>(buf.scales_in);
  auto b_in = static_cast<const T*>(buf.biases_in);
  auto s_out = static_cast<T*>(buf.scales_out);
  auto b_out = static_cast<T*>(buf.biases_out);
  float delta[N][group_size];
  float values[N][group_size];
  float scale[N];
  float bias[N];
  const size_t sg = size_t(row) * p.groups_per_row + g;
  for (int i = 0; i < N; ++i) {
    group_delta_at<group_size>(p, row, g + i, buf.a, buf.b, delta[i]);
    stock_fit<T, bits, group_size, MetalRounding>(
        buf.w_in + (sg + i) * words_per_group, s_in[sg + i], b_in[sg + i], delta[i],
        group_args<group_size>(p, row, g + i, row_k), values[i], scale[i], bias[i]);
  }
  for (int i = 0; i < N; ++i) {
    stock_store<T, bits, group_size, MetalRounding>(
        values[i], scale[i], bias[i], buf.w_out + (sg + i) * words_per_group, s_out + sg + i,
        b_out + sg + i);
  }
}

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
    int g = 0;
    if (p.policy == kStock) {
      for (; g + kStockBatch <= p.groups_per_row; g += kStockBatch) {
        fuse_stock_batch_at<T, bits, group_size, MetalRounding>(p, uint32_t(row), uint32_t(g), buf, row_k);
      }
    }
    for (; g < p.groups_per_row; ++g) {
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
  PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
#undef PYFUSE_CASE
  throw std::invalid_argument("[pyfuse.fuse_requant] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
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
