// The per-row math of the `calibrated` policy (error-feedback rounding on
// the kept grid, GPTQ/OPTQ style), written ONCE and included by the CPU
// rows (csrc/fuse_calibrated.cpp, run by FuseRequant), the Metal kernel
// (metal/fuse_calibrated.h) and its Linux simulation (csrc/metal_sim.cpp).
// The NumPy oracle is pyfuse/kernel/calibrated.py; every float operation
// below is one float32 rounding in the same order as there, so the two agree
// bit for bit (built with -ffp-contract=off: no FMA).
//
// One unit of work is one ROW: its columns are visited in order and each
// column's rounding error is pushed onto the later columns of the same row,
// so rows are independent and columns are not.
#pragma once

#include "csrc/fuse_math.h"

// The error push reads P and writes the targets: telling C++ they never
// alias lets the compiler vectorize it (Metal has no such qualifier).
#if defined(__METAL_VERSION__)
#define PF_RESTRICT
#else
#define PF_RESTRICT __restrict__
#endif

namespace pyfuse {

namespace {

// t[j] -= (err * p[j]) * inv_s for j in [0, n): one float32 rounding per
// operation, in the NumPy reference's order.
PF_INLINE void push_error(PF_DEVICE float* PF_RESTRICT t, const PF_DEVICE float* PF_RESTRICT p, int n,
                          float err, float inv_s) {
  for (int j = 0; j < n; ++j) {
    const float push = err * p[j];
    const float moved = push * inv_s;
    t[j] = t[j] - moved;
  }
}

// The buffers of one dispatch (rows are E * out, expert-major).
template <typename T>
struct CalibratedBuffers {
  const PF_DEVICE uint32_t* w_in;
  const PF_DEVICE T* scales_in;
  const PF_DEVICE T* biases_in;
  const PF_DEVICE float* a;
  const PF_DEVICE float* b;
  const PF_DEVICE float* prop;  // P [E, in, in], or unread when has_prop == 0
  PF_DEVICE uint32_t* w_out;
  PF_DEVICE T* scales_out;
  PF_DEVICE T* biases_out;
};

// A row's three phases (rows are E * out, expert-major; `t` is scratch of
// in_dims floats owned by the row). The CPU interleaves phase 2 of a few
// rows of one expert so that they share each row of P while it is in cache;
// Metal runs one row per thread (calibrated_row_at). Either way every
// element sees the same operations in the same order.

// 1. The targets in steps of each group's grid: t = q + delta / s. A group
// whose nearest codes (rint(t), before any error feedback) leave
// [0, 2^bits - 1] is re-fitted as under the preserve policy (MLX's affine
// rule, CPU flavour, on the float32 fused values q * s + z + delta) and its
// targets become (x - z') / s' on that grid (s', z' rounded to T: the grid
// stored). Each group's working grid is written to scales_out / biases_out,
// which the later phases read. A zero delta is always in range: nothing is
// re-fitted.
template <typename T, int bits, int group_size>
PF_INLINE void calibrated_targets(
    PF_CONSTANT_REF(FuseParams) p, uint32_t row, PF_THREAD const CalibratedBuffers<T>& io, PF_DEVICE float* t) {
  constexpr int words_per_group = group_size * bits / 32;
  const float n_bins = float((1 << bits) - 1);
  const uint32_t sg0 = row * uint32_t(p.groups_per_row);
  for (int g = 0; g < p.groups_per_row; ++g) {
    pf_code codes[group_size];
    float delta[group_size];
    unpack_group<bits, group_size>(io.w_in + size_t(sg0 + g) * words_per_group, codes);
    group_delta_at<group_size>(p, row, uint32_t(g), io.a, io.b, delta);
    const T s_in = io.scales_in[sg0 + g];
    const T z_in = io.biases_in[sg0 + g];
    const float s = static_cast<float>(s_in);
    PF_DEVICE float* tg = t + g * group_size;
    int out_of_range = 0;
    for (int j = 0; j < group_size; ++j) {
      const float step = delta[j] / s;
      tg[j] = float(int(codes[j])) + step;
      const float c = pf_rint(tg[j]);
      out_of_range |= int(c < 0.0f) | int(c > n_bins);
    }
    if (out_of_range == 0) {
      io.scales_out[sg0 + g] = s_in;
      io.biases_out[sg0 + g] = z_in;
      continue;
    }
    const float z = static_cast<float>(z_in);
    float values[group_size];
    for (int j = 0; j < group_size; ++j) {
      float x = float(int(codes[j])) * s;
      x = x + z;
      values[j] = x + delta[j];
    }
    float fit_s;
    float fit_z;
    fit_affine<float, bits, group_size, false>(values, fit_s, fit_z);
    const T s_out = static_cast<T>(fit_s);
    const T z_out = static_cast<T>(fit_z);
    const float s_grid = static_cast<float>(s_out);
    const float z_grid = static_cast<float>(z_out);
    for (int j = 0; j < group_size; ++j) {
      const float moved = values[j] - z_grid;
      tg[j] = moved / s_grid;
    }
    io.scales_out[sg0 + g] = s_out;
    io.biases_out[sg0 + g] = z_out;
  }
}

// 2. Column i: its code (nearest, clamped to [0, 2^bits - 1]: the error
// feedback can still push a target out of range) replaces its
// target, and its error in weight units is pushed onto the later columns
// through `p_i` (row i of the expert's P: P[i, j] = U[i, j] / U[i, i], j > i;
// null: plain rounding). An error of 0 (always, for a zero delta) would add
// -0 or +0: skipped, which changes no code.
template <typename T, int bits, int group_size>
PF_INLINE void calibrated_step(
    int i,
    int in_dims,
    const PF_DEVICE T* row_scales,
    PF_DEVICE float* t,
    const PF_DEVICE float* p_i) {
  const float n_bins = float((1 << bits) - 1);
  const float ti = t[i];
  float c = pf_rint(ti);
  c = c < 0.0f ? 0.0f : c;
  c = c > n_bins ? n_bins : c;
  t[i] = c;
  const float err = (ti - c) * static_cast<float>(row_scales[i / group_size]);
  if (p_i == nullptr || err == 0.0f) {
    return;
  }
  for (int j = i + 1; j < in_dims;) {
    const int g = j / group_size;
    const int end = (g + 1) * group_size;
    const float inv_s = 1.0f / static_cast<float>(row_scales[g]);
    push_error(t + j, p_i + j, end - j, err, inv_s);
    j = end;
  }
}

// 3. Pack the codes; the working grid (kept, or re-fitted in phase 1) is
// rescaled by the DoRA row factor k (1 without DoRA), as the preserve policy
// does.
template <typename T, int bits, int group_size>
PF_INLINE void calibrated_store(
    PF_CONSTANT_REF(FuseParams) p, uint32_t row, float k, PF_THREAD const CalibratedBuffers<T>& io,
    const PF_DEVICE float* t) {
  constexpr int words_per_group = group_size * bits / 32;
  const uint32_t sg0 = row * uint32_t(p.groups_per_row);
  for (int g = 0; g < p.groups_per_row; ++g) {
    pf_code codes[group_size];
    for (int j = 0; j < group_size; ++j) {
      codes[j] = pf_code(int(t[g * group_size + j]));
    }
    pack_group<bits, group_size>(codes, io.w_out + size_t(sg0 + g) * words_per_group);
    if (k != 1.0f) {
      io.scales_out[sg0 + g] = static_cast<T>(static_cast<float>(io.scales_out[sg0 + g]) * k);
      io.biases_out[sg0 + g] = static_cast<T>(static_cast<float>(io.biases_out[sg0 + g]) * k);
    }
  }
}

// The expert's P (prop: [E, in, in]) for row `row`, or null when has_prop == 0.
PF_INLINE const PF_DEVICE float* calibrated_prop(
    PF_CONSTANT_REF(FuseParams) p, int has_prop, uint32_t row, const PF_DEVICE float* prop) {
  if (has_prop == 0) {
    return nullptr;
  }
  return prop + size_t(row / uint32_t(p.out_dims)) * p.in_dims * p.in_dims;
}

// One whole row (Metal's unit of work).
template <typename T, int bits, int group_size>
PF_INLINE void calibrated_row_at(
    PF_CONSTANT_REF(FuseParams) p, int has_prop, uint32_t row, float k, PF_THREAD const CalibratedBuffers<T>& io,
    PF_DEVICE float* t) {
  calibrated_targets<T, bits, group_size>(p, row, io, t);
  const PF_DEVICE float* pe = calibrated_prop(p, has_prop, row, io.prop);
  const PF_DEVICE T* row_scales = io.scales_out + size_t(row) * p.groups_per_row;  // the working grid
  for (int i = 0; i < p.in_dims; ++i) {
    calibrated_step<T, bits, group_size>(
        i, p.in_dims, row_scales, t, pe == nullptr ? nullptr : pe + size_t(i) * p.in_dims);
  }
  calibrated_store<T, bits, group_size>(p, row, k, io, t);
}

} // namespace
} // namespace pyfuse
