// The Metal kernel run on the CPU over a simulated grid (tests only).
#pragma once

#include <optional>
#include <vector>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace pyfuse {

// inputs: w, scales, biases, a (float32), b (float32)[, magnitude (float32)],
// all row-contiguous; policy: 0 stock, 1 preserve, 2 stochastic, 3
// calibrated (with prop, float32 [..., in, in], or none: plain rounding).
std::vector<mx::array> simulate_metal_fuse_requant(
    std::vector<mx::array> inputs, float scale, int group_size, int bits, int policy, uint32_t seed,
    std::optional<mx::array> prop = std::nullopt);

} // namespace pyfuse
