// The calibrated policy's CPU rows: FuseRequant (csrc/fuse_requant.cpp)
// evaluates policy "calibrated" through select_calibrated_rows_fn. The
// per-row math is in csrc/math/calibrated.h, shared with the Metal kernel.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "csrc/math/calibrated.h"
#include "csrc/fuse_cpu.h"
#include "csrc/math/dispatch.h"

namespace pyfuse {

namespace {

// Rows of one expert calibrated together: each row of P is read once per
// block instead of once per row (P of a 2048-input expert is 16 MB).
constexpr size_t kRowBlock = 8;

template <typename T, int bits, int group_size>
void calibrate_rows(const FuseParams& p, const CpuBuffers& buf, float* row_k, size_t row0, size_t row1) {
  const CalibratedBuffers<T> io{buf.w_in, static_cast<const T*>(buf.scales_in),
                                static_cast<const T*>(buf.biases_in), buf.a, buf.b, buf.prop, buf.w_out,
                                static_cast<T*>(buf.scales_out), static_cast<T*>(buf.biases_out)};
  const size_t in_dims = p.in_dims;
  std::vector<float> t(kRowBlock * in_dims);
  for (size_t first = row0; first < row1;) {
    const size_t expert_end = (first / p.out_dims + 1) * p.out_dims;
    const size_t last = std::min({row1, first + kRowBlock, expert_end});
    const size_t n = last - first;
    for (size_t k = 0; k < n; ++k) {
      calibrated_targets<T, bits, group_size>(p, uint32_t(first + k), io, t.data() + k * in_dims);
    }
    const float* pe = calibrated_prop(p, buf.prop != nullptr, uint32_t(first), buf.prop);
    for (size_t i = 0; i < in_dims; ++i) {
      const float* p_i = pe == nullptr ? nullptr : pe + i * in_dims;
      for (size_t k = 0; k < n; ++k) {
        calibrated_step<T, bits, group_size>(int(i), int(in_dims), io.scales_out + (first + k) * p.groups_per_row,
                                             t.data() + k * in_dims, p_i);
      }
    }
    for (size_t k = 0; k < n; ++k) {
      const uint32_t row = uint32_t(first + k);
      if (p.has_k) {
        row_k[row] = row_factor_at<T, bits, group_size>(p, row, io.w_in, io.scales_in, io.biases_in, io.a,
                                                        io.b, buf.magnitude);
      }
      calibrated_store<T, bits, group_size>(p, row, p.has_k ? row_k[row] : 1.0f, io, t.data() + k * in_dims);
    }
    first = last;
  }
}

template <typename T>
RowsFn select_typed(int bits, int group_size) {
#define PYFUSE_CASE(B, G) \
  if (bits == B && group_size == G) return &calibrate_rows<T, B, G>;
  PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
#undef PYFUSE_CASE
  throw std::invalid_argument("[pyfuse.fuse_requant] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
}

} // namespace

RowsFn select_calibrated_rows_fn(mlx::core::Dtype dtype, int bits, int group_size) {
  if (dtype == mlx::core::float32) return select_typed<float>(bits, group_size);
  if (dtype == mlx::core::float16) return select_typed<mlx::core::float16_t>(bits, group_size);
  return select_typed<mlx::core::bfloat16_t>(bits, group_size);
}

} // namespace pyfuse
