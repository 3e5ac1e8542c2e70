// The Metal kernel of the calibrated policy: one thread per row (a row's
// columns depend on each other; rows do not), each with its own scratch row
// of targets in device memory, calling the shared math in
// csrc/math/calibrated.h. Compiled by Metal from fuse_requant.metal and
// as C++ on Linux through metal_shim.h (csrc/metal_sim.cpp).
#pragma once

#include "csrc/math/calibrated.h"

template <typename T, int group_size, int bits>
[[kernel]] void fuse_calibrated(
    const device float* prop [[buffer(0)]],
    device float* scratch [[buffer(1)]],
    constant const pyfuse::FuseParams& p [[buffer(2)]],
    constant const int& has_prop [[buffer(3)]],
    constant const uint32_t& n_rows [[buffer(4)]],
    const device uint32_t* w_in [[buffer(5)]],
    const device T* scales_in [[buffer(6)]],
    const device T* biases_in [[buffer(7)]],
    const device float* a [[buffer(8)]],
    const device float* b [[buffer(9)]],
    const device float* row_k [[buffer(10)]],
    device uint32_t* w_out [[buffer(11)]],
    device T* scales_out [[buffer(12)]],
    device T* biases_out [[buffer(13)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n_rows) {
    return;
  }
  const float k = p.has_k ? row_k[gid] : 1.0f;
  const pyfuse::CalibratedBuffers<T> io{w_in, scales_in, biases_in, a, b, prop, w_out, scales_out, biases_out};
  pyfuse::calibrated_row_at<T, bits, group_size>(
      p, has_prop, gid, k, io, scratch + size_t(gid) * uint32_t(p.in_dims));
}
