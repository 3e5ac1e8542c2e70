// The fuse of one group under each policy, and the DoRA row factor.
#pragma once

#include "csrc/math/params.h"
#include "csrc/math/quantize.h"
#include "csrc/math/stochastic.h"
#include "csrc/math/values.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// Rescale factors within 1e-5 of 1 are float32 noise of the row norm (a
// sum of in/group_size * group_size squares, added in another order by
// mx.linalg.norm and by each backend): treated as exactly 1, so a zero DoRA
// delta with unchanged magnitudes is bit-exact. A real DoRA change of the
// row norm by less than 1e-5 is far below any quantization step.
constexpr PF_CONSTANT float kDoraUnitTolerance = 1e-5f;

// The stock policy in two halves, so that the CPU can batch groups
// (csrc/fuse_cpu.cpp): the next groups' values are computed while one
// group's fit (a chain of divisions) completes.
// 1. The fused values (DoRA-rescaled by k) and their affine fit.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void stock_fit(
    const PF_DEVICE uint32_t* words_in,
    T scale_in,
    T bias_in,
    const PF_THREAD float* delta,
    GroupArgs args,
    PF_THREAD float* values,
    PF_THREAD float& scale,
    PF_THREAD float& bias) {
  stock_values<T, bits, group_size>(words_in, scale_in, bias_in, delta, args.no_nan != 0, values);
  if (args.k != 1.0f) {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to<T>(args.k * values[j]);
    }
  }
  fit_affine<T, bits, group_size, MetalRounding>(values, scale, bias);
}

// 2. The codes on that grid, packed, and the grid in T.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void stock_store(
    const PF_THREAD float* values,
    float scale,
    float bias,
    PF_DEVICE uint32_t* words_out,
    PF_DEVICE T* scale_out,
    PF_DEVICE T* bias_out) {
  pf_code codes[group_size];
  round_to_grid<bits, group_size, MetalRounding>(values, scale, bias, codes);
  pack_group<bits, group_size>(codes, words_out);
  *scale_out = static_cast<T>(scale);
  *bias_out = static_cast<T>(bias);
}

// Fuses one group. `delta` holds the group's float32 delta. Writes the
// group's packed words and its (scale, bias) in T.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fuse_group(
    int policy,
    const PF_DEVICE uint32_t* words_in,
    T scale_in,
    T bias_in,
    const PF_THREAD float* delta,
    GroupArgs args,
    PF_DEVICE uint32_t* words_out,
    PF_DEVICE T* scale_out,
    PF_DEVICE T* bias_out) {
  const float n_bins = float((1 << bits) - 1);
  float values[group_size];
  pf_code codes[group_size];
  float scale;
  float bias;

  if (policy == kStock) {
    stock_fit<T, bits, group_size, MetalRounding>(words_in, scale_in, bias_in, delta, args, values, scale, bias);
    stock_store<T, bits, group_size, MetalRounding>(values, scale, bias, words_out, scale_out, bias_out);
    return;
  }

  // preserve / stochastic: move each code by the delta measured in steps of
  // the group's own grid; a zero delta leaves every code as it was.
  const bool stochastic = policy == kStochastic;
  const float s = static_cast<float>(scale_in);
  const float b = static_cast<float>(bias_in);
  pf_code old_codes[group_size];
  unpack_group<bits, group_size>(words_in, old_codes);
  float steps[group_size];  // the new codes, before the range check
  for (int j = 0; j < group_size; ++j) {
    const float q = float(int(old_codes[j]));
    float step = delta[j] / s;
    steps[j] = q + step;
  }
  if (stochastic) {
    for (int j = 0; j < group_size; ++j) {
      steps[j] = stochastic_round(steps[j], stochastic_uniform(args.key, args.index0 + uint32_t(j)));
    }
  } else {
    for (int j = 0; j < group_size; ++j) {
      steps[j] = pf_rint(steps[j]);
    }
  }
  int out_of_range = 0;
  for (int j = 0; j < group_size; ++j) {
    out_of_range |= int(steps[j] < 0.0f) | int(steps[j] > n_bins);
  }
  const bool in_range = out_of_range == 0;
  if (in_range) {
    for (int j = 0; j < group_size; ++j) {
      codes[j] = pf_code(int(steps[j]));
    }
    pack_group<bits, group_size>(codes, words_out);
    if (args.k != 1.0f) {
      *scale_out = static_cast<T>(s * args.k);
      *bias_out = static_cast<T>(b * args.k);
    } else {
      *scale_out = scale_in;
      *bias_out = bias_in;
    }
    return;
  }

  // Re-fit: the delta left the grid's range. MLX's affine rule (CPU
  // flavour on every backend: this policy is pyfuse's own and must agree
  // everywhere) on the float32 fused values.
  for (int j = 0; j < group_size; ++j) {
    const float q = float(int(old_codes[j]));
    float x = q * s;
    x = x + b;
    x = x + delta[j];
    values[j] = x * args.k;
  }
  fit_affine<float, bits, group_size, false>(values, scale, bias);
  if (stochastic) {
    for (int j = 0; j < group_size; ++j) {
      float t = (values[j] - bias) / scale;
      t = stochastic_round(t, stochastic_uniform(args.key, args.index0 + uint32_t(j)));
      t = t < 0.0f ? 0.0f : t;
      t = t > n_bins ? n_bins : t;
      codes[j] = pf_code(int(t));
    }
  } else {
    round_to_grid<bits, group_size, false>(values, scale, bias, codes);
  }
  pack_group<bits, group_size>(codes, words_out);
  *scale_out = static_cast<T>(scale);
  *bias_out = static_cast<T>(bias);
}

// Sum of squares of the stock fused row values of one group (DoRA norms).
template <typename T, int bits, int group_size>
PF_INLINE float group_sumsq(
    const PF_DEVICE uint32_t* words, T scale, T bias, const PF_THREAD float* delta, bool no_nan) {
  float values[group_size];
  stock_values<T, bits, group_size>(words, scale, bias, delta, no_nan, values);
  float acc = 0.0f;
  for (int j = 0; j < group_size; ++j) {
    float sq = values[j] * values[j];
    acc = acc + sq;
  }
  return acc;
}

// The DoRA factor magnitude / ||row||, snapped to 1 within float noise.
PF_INLINE float dora_factor(float magnitude, float sumsq) {
  float k = magnitude / pf_math::sqrt(sumsq);
  return pf_math::abs(k - 1.0f) <= kDoraUnitTolerance ? 1.0f : k;
}

} // namespace
} // namespace pyfuse
