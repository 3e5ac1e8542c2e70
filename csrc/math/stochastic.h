// Stochastic rounding: a counter-based hash giving every element of a
// tensor its own uniform u, identical on every backend and in the pure-MLX
// reference (pyfuse/kernel/reference.py, hash_uniform).
#pragma once

#include "csrc/math/round.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// lowbias32 (C. Wellons): a counter-based hash, identical on every backend.
PF_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

PF_INLINE uint32_t stochastic_key(uint32_t seed) {
  return lowbias32(lowbias32(seed) ^ 0x9e3779b9u);
}

// u in [0, 1) for the element with flat index `index` in the whole tensor.
PF_INLINE float stochastic_uniform(uint32_t key, uint32_t index) {
  return float(lowbias32(index ^ key) >> 8) * (1.0f / 16777216.0f);
}

// floor(t + u) as if computed exactly: the float sum t + u rounds up to the
// next integer when u is within float spacing of 1 (a few codes per million
// at 8 bits), which would move codes even for a zero delta. Splitting t into
// its integer part and fraction keeps a zero delta (fraction 0) exact.
PF_INLINE float stochastic_round(float t, float u) {
  const float whole = pf_floor(t);
  const float frac = t - whole;  // exact
  return u >= 1.0f - frac ? whole + 1.0f : whole;
}

} // namespace
} // namespace pyfuse
