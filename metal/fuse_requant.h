// The Metal kernels of pyfuse's fuse: thin wrappers that give each GPU
// thread one group (or, for DoRA norms, one row) and call the shared math
// in csrc/fuse_math.h. Compiled by Metal from fuse_requant.metal, and as C++
// on Linux through metal_shim.h (csrc/metal_sim.cpp) so that tests can run
// this very source over a simulated grid.
#pragma once

#include "csrc/fuse_math.h"

// One thread per group: x = group within the row, y = row (E * out rows).
// Stock uses MLX's Metal quantizer rules (MetalRounding = true).
template <typename T, int group_size, int bits>
[[kernel]] void fuse_requant(
    const device uint32_t* w_in [[buffer(0)]],
    const device T* scales_in [[buffer(1)]],
    const device T* biases_in [[buffer(2)]],
    const device float* a [[buffer(3)]],
    const device float* b [[buffer(4)]],
    const device float* row_k [[buffer(5)]],
    device uint32_t* w_out [[buffer(6)]],
    device T* scales_out [[buffer(7)]],
    device T* biases_out [[buffer(8)]],
    constant const pyfuse::FuseParams& p [[buffer(9)]],
    uint2 gid [[thread_position_in_grid]]) {
  if (gid.x >= uint32_t(p.groups_per_row)) {
    return;
  }
  pyfuse::fuse_group_at<T, bits, group_size, true>(
      p, gid.y, gid.x, w_in, scales_in, biases_in, a, b, row_k,
      w_out, scales_out, biases_out);
}

// DoRA: one thread per row computes magnitude / ||fused row|| into row_k.
template <typename T, int group_size, int bits>
[[kernel]] void fuse_requant_row_factor(
    const device uint32_t* w_in [[buffer(0)]],
    const device T* scales_in [[buffer(1)]],
    const device T* biases_in [[buffer(2)]],
    const device float* a [[buffer(3)]],
    const device float* b [[buffer(4)]],
    const device float* magnitude [[buffer(5)]],
    device float* row_k [[buffer(6)]],
    constant const pyfuse::FuseParams& p [[buffer(9)]],
    constant const uint32_t& n_rows [[buffer(10)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n_rows) {
    return;
  }
  row_k[gid] = pyfuse::row_factor_at<T, bits, group_size>(
      p, gid, w_in, scales_in, biases_in, a, b, magnitude);
}
