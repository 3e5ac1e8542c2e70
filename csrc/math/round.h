// Rounding helpers: one T operation's result (round_to), and rint/floor
// that are exact without SSE4.1 or library calls.
#pragma once

#include "csrc/math/backend.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// round_to<T>(x): x rounded to the nearest T (ties to even) and widened
// back to float: one T operation's result, as MLX computes T arithmetic
// (in float, then rounded). pf_rint / pf_floor: rint and floor.
//
// round_to_not_nan<T>(x): the same, without the NaN test. Exact for every
// number and for the default NaN that an invalid operation (inf - inf,
// 0 * inf) produces, which stays a NaN; only a NaN carrying a payload could
// come out as another value. The stock values use it when no input holds a
// NaN (FuseParams::no_nan): then every NaN they meet is a default one.
#if defined(__METAL_VERSION__)
template <typename T>
PF_INLINE float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <typename T>
PF_INLINE float round_to_not_nan(float x) {
  return round_to<T>(x);
}
PF_INLINE float pf_rint(float x) {
  return metal::rint(x);
}
PF_INLINE float pf_floor(float x) {
  return metal::floor(x);
}
#else
// Bit-level versions: the x86-64 baseline (no SSE4.1, no F16C) has no
// instruction for rint or half conversion, and library calls would cost
// more than the rest of the fuse. Each is exact: tests compare every
// result with MLX's own types.
PF_INLINE uint32_t pf_bits(float x) {
  return __builtin_bit_cast(uint32_t, x);
}
PF_INLINE float pf_from_bits(uint32_t u) {
  return __builtin_bit_cast(float, u);
}
#if defined(__SSE4_1__) || defined(__aarch64__)
// One instruction (roundps / frintn), and it vectorizes.
PF_INLINE float pf_rint(float x) {
  return __builtin_rintf(x);
}
#else
// Round to nearest even integer for |x| < 2^23 by the 2^23 trick (larger
// floats are integers already). Needs default rounding and no fast-math.
PF_INLINE float pf_rint(float x) {
  const float big = 8388608.0f;
  float ax = __builtin_fabsf(x);
  float r = (ax + big) - big;
  r = __builtin_copysignf(r, x);
  return ax < big ? r : x;
}
#endif
PF_INLINE float pf_floor(float x) {
  float r = pf_rint(x);
  return r > x ? r - 1.0f : r;
}
template <typename T>
PF_INLINE float round_to_not_nan(float x);
template <>
PF_INLINE float round_to_not_nan<float>(float x) {
  return x;
}
template <>
PF_INLINE float round_to_not_nan<mlx::core::bfloat16_t>(float x) {
  // Ties to even on the 16 dropped bits (a default NaN keeps its bits).
  uint32_t u = pf_bits(x);
  return pf_from_bits((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
template <>
PF_INLINE float round_to_not_nan<mlx::core::float16_t>(float x) {
  // IEEE float -> half (ties to even) -> float, as MLX's conversion does.
  float ax = __builtin_fabsf(x);
  // Normal halves: keep 10 mantissa bits (ties to even on the dropped 13).
  uint32_t u = pf_bits(ax);
  float normal = pf_from_bits((u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);
  // Subnormal halves (|x| < 2^-14): multiples of 2^-24; scaling by powers
  // of two is exact.
  float sub = pf_rint(ax * 16777216.0f) * (1.0f / 16777216.0f);
  float r = ax < 6.103515625e-05f ? sub : normal;
  r = ax >= 65520.0f ? __builtin_inff() : r;  // rounds past the largest half
  return __builtin_copysignf(r, x);  // a default NaN: `normal` keeps it a NaN
}
template <typename T>
PF_INLINE float round_to(float x) {
  return x != x ? x : round_to_not_nan<T>(x);
}
template <>
PF_INLINE float round_to<mlx::core::bfloat16_t>(float x) {
  // MLX's float -> bfloat16 turns every NaN into 0x7FC0.
  return x != x ? pf_from_bits(0x7FC00000u) : round_to_not_nan<mlx::core::bfloat16_t>(x);
}
#endif

} // namespace
} // namespace pyfuse
