// The quantizer: MLX's affine rule (extremes -> scale and bias) and the
// nearest codes on a grid, with MLX's CPU or Metal rounding.
#pragma once

#include "csrc/math/pack.h"
#include "csrc/math/round.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// Folds the group's values into (w_min, w_max), which come in holding the
// starting values. Min and max do not depend on the order of the values (the
// sign of a zero extreme changes nothing downstream), so C++ takes eight
// lanes at a time with GCC/clang vector extensions, which compilers do not
// derive from the scalar loop; Metal runs the scalar loop per thread.
template <int group_size>
PF_INLINE void group_extremes(const PF_THREAD float* values, PF_THREAD float& w_min, PF_THREAD float& w_max) {
#if defined(__METAL_VERSION__)
  for (int j = 0; j < group_size; ++j) {
    w_max = metal::max(w_max, values[j]);
    w_min = metal::min(w_min, values[j]);
  }
#else
  typedef float f8 __attribute__((vector_size(32)));
  f8 lo = {w_min, w_min, w_min, w_min, w_min, w_min, w_min, w_min};
  f8 hi = {w_max, w_max, w_max, w_max, w_max, w_max, w_max, w_max};
  for (int j = 0; j < group_size; j += 8) {
    f8 v;
    __builtin_memcpy(&v, values + j, sizeof(v));
    lo = v < lo ? v : lo;
    hi = hi < v ? v : hi;
  }
  // Halve the lanes three times (vector min/max), then fold in the start.
  typedef float f4 __attribute__((vector_size(16)));
  f4 lo4, hi4, lo_hi, hi_hi;
  __builtin_memcpy(&lo4, &lo, sizeof(f4));
  __builtin_memcpy(&lo_hi, reinterpret_cast<const char*>(&lo) + sizeof(f4), sizeof(f4));
  __builtin_memcpy(&hi4, &hi, sizeof(f4));
  __builtin_memcpy(&hi_hi, reinterpret_cast<const char*>(&hi) + sizeof(f4), sizeof(f4));
  lo4 = lo_hi < lo4 ? lo_hi : lo4;
  hi4 = hi4 < hi_hi ? hi_hi : hi4;
  const float lo2[2] = {lo4[0] < lo4[2] ? lo4[0] : lo4[2], lo4[1] < lo4[3] ? lo4[1] : lo4[3]};
  const float hi2[2] = {hi4[0] < hi4[2] ? hi4[2] : hi4[0], hi4[1] < hi4[3] ? hi4[3] : hi4[1]};
  const float lo1 = lo2[0] < lo2[1] ? lo2[0] : lo2[1];
  const float hi1 = hi2[0] < hi2[1] ? hi2[1] : hi2[0];
  w_min = lo1 < w_min ? lo1 : w_min;
  w_max = w_max < hi1 ? hi1 : w_max;
#endif
}

// The rounding of MLX's quantizer: rint on the CPU, round (half away from
// zero) on Metal. A struct, not a ternary: Metal's C++ has no `if
// constexpr`, and a call left in the loop body would stop vectorization.
template <bool MetalRounding>
struct GridRound {
  static PF_INLINE float apply(float t) {
    return pf_rint(t);
  }
};
template <>
struct GridRound<true> {
  static PF_INLINE float apply(float t) {
    return pf_math::round(t);
  }
};

// MLX's affine rule: the (scale, bias) that put the group's extreme of
// larger magnitude exactly on the grid.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fit_affine(const PF_THREAD float* values, PF_THREAD float& scale, PF_THREAD float& bias) {
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  float w_min;
  float w_max;
  if (MetalRounding) {
    w_min = static_cast<float>(pf_limits_max<T>());
    w_max = 0.0f;
  } else {
    w_min = INFINITY;
    w_max = -w_min;
  }
  group_extremes<group_size>(values, w_min, w_max);
  const bool mask = pf_math::abs(w_min) > pf_math::abs(w_max);
  float s = pf_math::max((w_max - w_min) / n_bins, eps);
  s = mask ? s : -s;
  const float edge = mask ? w_min : w_max;
  const float q0 = GridRound<MetalRounding>::apply(edge / s);
  bias = 0.0f;
  if (q0 != 0.0f) {
    s = edge / q0;
    bias = edge;
  }
  scale = s;
}

// Nearest codes on the (scale, bias) grid, clamped to [0, 2^bits - 1].
template <int bits, int group_size, bool MetalRounding>
PF_INLINE void round_to_grid(
    const PF_THREAD float* values, float scale, float bias, PF_THREAD pf_code* codes) {
  for (int j = 0; j < group_size; ++j) {
    float t = (values[j] - bias) / scale;
    // Clamped as an integer (t is an integer-valued float well inside
    // int range: the grid spans the group's values), which vectorizes.
    int q = int(GridRound<MetalRounding>::apply(t));
    q = q < 0 ? 0 : q;
    codes[j] = pf_code(q > (1 << bits) - 1 ? (1 << bits) - 1 : q);
  }
}

} // namespace
} // namespace pyfuse
