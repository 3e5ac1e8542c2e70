// The Metal kernel source (metal/fuse_requant.h), compiled as C++ through
// metal/metal_shim.h, run over a simulated grid on the CPU: one call of the
// kernel function per grid position, exactly as Metal would launch them.
// Used by the extension (csrc/metal_sim.cpp, for tests and self-check) and
// by the standalone harness of the kernel math (tests/native/harness).
//
// The shim turns `device`, `constant` and `thread` into nothing for
// everything below it: include this header after every other one.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/metal_shim.h"
#include "metal/fuse_requant.h"

namespace pyfuse {

template <typename T, int group_size, int bits>
void run_metal_grid(const CpuBuffers& buf, const FuseParams& p, uint32_t n_rows) {
  const auto s_in = static_cast<const T*>(buf.scales_in);
  const auto b_in = static_cast<const T*>(buf.biases_in);
  std::vector<float> row_k(n_rows, 1.0f);
  if (buf.magnitude) {
    for (uint32_t r = 0; r < n_rows; ++r) {
      fuse_requant_row_factor<T, group_size, bits>(
          buf.w_in, s_in, b_in, buf.a, buf.b, buf.magnitude, row_k.data(), p, n_rows, r);
    }
  }
  // A grid rounded up to whole threadgroups of 32, as dispatch_threads may
  // launch: the kernel must ignore the extra positions.
  uint32_t gx = ((uint32_t(p.groups_per_row) + 31) / 32) * 32;
  for (uint32_t y = 0; y < n_rows; ++y) {
    for (uint32_t x = 0; x < gx; ++x) {
      fuse_requant<T, group_size, bits>(
          buf.w_in, s_in, b_in, buf.a, buf.b, row_k.data(), buf.w_out, static_cast<T*>(buf.scales_out),
          static_cast<T*>(buf.biases_out), p, uint2{x, y});
    }
  }
}

} // namespace pyfuse
