// The fused values of one group: the float32 LoRA delta and MLX's
// dequantize, every operation rounded as MLX's ops round it.
#pragma once

#include "csrc/math/pack.h"
#include "csrc/math/round.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// delta[j] for inputs i0 .. i0+group_size-1 of row o: `b_row` is b[o, :],
// `a` points at a[0, i0] with row stride `in_dims`; scale * b[o, k] is
// rounded to float first, as mlx-lm computes (scale * b) @ a.
template <int group_size>
PF_INLINE void group_delta(
    float scale,
    const PF_DEVICE float* b_row,
    const PF_DEVICE float* a,
    int rank,
    int in_dims,
    PF_THREAD float* delta) {
  for (int j = 0; j < group_size; ++j) {
    delta[j] = 0.0f;
  }
  for (int k = 0; k < rank; ++k) {
    const float sb = scale * b_row[k];
    const PF_DEVICE float* ak = a + k * in_dims;
    for (int j = 0; j < group_size; ++j) {
      float p = sb * ak[j];  // separate statements: never an FMA
      delta[j] = delta[j] + p;
    }
  }
}

// MLX's dequantized weight T(T(q) * s) + b, each operation rounded to T.
template <typename T>
PF_INLINE float dequantized(float q, float s, float b) {
  return round_to<T>(round_to<T>(q * s) + b);
}

// Variable vector shuffles (GCC's __builtin_shuffle) compile to one or two
// permute instructions with AVX2 and later; elsewhere values are computed
// code by code.
#if !defined(__METAL_VERSION__) && !defined(__clang__) && defined(__GNUC__) && defined(__AVX2__)
#define PF_VECTOR_TABLE 1
#else
#define PF_VECTOR_TABLE 0
#endif

// The stock fused weight `dequantize(q) + T(delta)`, every operation
// rounded to T as MLX's ops do: T(T(T(q) * s) + b) + T(delta). `no_nan`:
// see round_to_not_nan.
template <typename T, int bits, int group_size>
PF_INLINE void stock_values(
    const PF_DEVICE uint32_t* words,
    T scale,
    T bias,
    const PF_THREAD float* delta,
    bool no_nan,
    PF_THREAD float* values) {
  const float s = static_cast<float>(scale);
  const float b = static_cast<float>(bias);
  pf_code codes[group_size];
  unpack_group<bits, group_size>(words, codes);
#if PF_VECTOR_TABLE
  if constexpr ((1 << bits) <= 16) {
    // Few codes: dequantize each possible code once (a vector or two), then
    // look the group's codes up with variable shuffles (vpermps and kin).
    typedef float f8 __attribute__((vector_size(32)));
    typedef int32_t i8 __attribute__((vector_size(32)));
    constexpr int n_codes = 1 << bits;
    float table[16] = {};
#pragma GCC unroll 1  // kept a loop, so that it vectorizes
    for (int q = 0; q < n_codes; ++q) {
      table[q] = dequantized<T>(float(q), s, b);
    }
    f8 lo, hi;
    __builtin_memcpy(&lo, table, sizeof(f8));
    __builtin_memcpy(&hi, table + 8, sizeof(f8));
    for (int j = 0; j < group_size; j += 8) {
      i8 idx;
      __builtin_memcpy(&idx, codes + j, sizeof(idx));
      f8 w = n_codes <= 8 ? __builtin_shuffle(lo, idx) : __builtin_shuffle(lo, hi, idx);
      __builtin_memcpy(values + j, &w, sizeof(w));
    }
  } else
#endif
  {
    for (int j = 0; j < group_size; ++j) {
      values[j] = dequantized<T>(float(int(codes[j])), s, b);
    }
  }
  if (no_nan) {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to_not_nan<T>(values[j] + round_to_not_nan<T>(delta[j]));
    }
  } else {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to<T>(values[j] + round_to<T>(delta[j]));
    }
  }
}

} // namespace
} // namespace pyfuse
