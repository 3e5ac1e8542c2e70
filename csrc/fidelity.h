// Sums for the fidelity figures of one fused tensor (see csrc/fidelity.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace pyfuse {

struct FidelitySums {
  double dd = 0;  // ||delta||^2
  double cc = 0;  // ||change||^2
  double cd = 0;  // <change, delta>
  double ww = 0;  // ||W before||^2
  int64_t weights_changed = 0;
  int64_t codes_changed = 0;
  int64_t groups_refit = 0;  // groups whose (scale, bias) changed
  double max_abs = 0;
};

// inputs: w0, s0, b0, w1, s1, b1 and, for a delta, a [..., r, in], b [..., out, r].
FidelitySums fidelity_sums(std::vector<mx::array> inputs, float scale, int group_size, int bits);

} // namespace pyfuse
