// Where a group lives in the tensors of one dispatch (rows are E * out,
// expert-major): the entry points every backend calls per group or row.
#pragma once

#include "csrc/math/fuse_group.h"
#include "csrc/math/params.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

// The float32 delta of group `g` of row `row` (rows are E * out, expert-major).
template <int group_size>
PF_INLINE void group_delta_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    uint32_t g,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    PF_THREAD float* delta) {
  const uint32_t expert = row / uint32_t(p.out_dims);
  group_delta<group_size>(
      p.scale,
      b + size_t(row) * p.rank,
      a + size_t(expert) * p.rank * p.in_dims + size_t(g) * group_size,
      p.rank,
      p.in_dims,
      delta);
}

// The per-group arguments of group `g` of row `row`.
template <int group_size>
PF_INLINE GroupArgs group_args(PF_CONSTANT_REF(FuseParams) p, uint32_t row, uint32_t g, const PF_DEVICE float* row_k) {
  GroupArgs args;
  args.k = p.has_k ? row_k[row] : 1.0f;
  args.key = p.key;
  args.index0 = row * uint32_t(p.in_dims) + g * uint32_t(group_size);
  args.no_nan = p.no_nan;
  return args;
}

// Fuses group `g` of row `row` (the unit of work of every backend).
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fuse_group_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    uint32_t g,
    const PF_DEVICE uint32_t* w_in,
    const PF_DEVICE T* scales_in,
    const PF_DEVICE T* biases_in,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    const PF_DEVICE float* row_k,
    PF_DEVICE uint32_t* w_out,
    PF_DEVICE T* scales_out,
    PF_DEVICE T* biases_out) {
  constexpr int words_per_group = group_size * bits / 32;
  const uint32_t sg = row * uint32_t(p.groups_per_row) + g;
  const uint32_t wo = sg * uint32_t(words_per_group);
  float delta[group_size];
  group_delta_at<group_size>(p, row, g, a, b, delta);
  const GroupArgs args = group_args<group_size>(p, row, g, row_k);
  fuse_group<T, bits, group_size, MetalRounding>(
      p.policy, w_in + wo, scales_in[sg], biases_in[sg], delta, args,
      w_out + wo, scales_out + sg, biases_out + sg);
}

// The DoRA factor of row `row`: magnitude[row] / ||stock fused row||.
template <typename T, int bits, int group_size>
PF_INLINE float row_factor_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    const PF_DEVICE uint32_t* w_in,
    const PF_DEVICE T* scales_in,
    const PF_DEVICE T* biases_in,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    const PF_DEVICE float* magnitude) {
  constexpr int words_per_group = group_size * bits / 32;
  float sumsq = 0.0f;
  for (int g = 0; g < p.groups_per_row; ++g) {
    const uint32_t sg = row * uint32_t(p.groups_per_row) + uint32_t(g);
    float delta[group_size];
    group_delta_at<group_size>(p, row, uint32_t(g), a, b, delta);
    float part = group_sumsq<T, bits, group_size>(
        w_in + size_t(sg) * words_per_group, scales_in[sg], biases_in[sg], delta, p.no_nan != 0);
    sumsq = sumsq + part;
  }
  return dora_factor(magnitude[row], sumsq);
}

} // namespace
} // namespace pyfuse
