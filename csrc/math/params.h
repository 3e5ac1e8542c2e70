// The data every backend shares: the policies, the parameters of one
// dispatch (passed to Metal as one constant buffer, so its layout is the
// same for the host and the GPU) and the per-group arguments.
#pragma once

#include "csrc/math/backend.h"
#if !defined(__METAL_VERSION__)
#include <cstddef>
#endif

namespace pyfuse {

// In the order of pyfuse/options.py's POLICIES (the host maps names to
// these numbers through the generated PYFUSE_FOR_EACH_POLICY and checks the
// count against kNumPolicies).
// kCalibrated: the rows of csrc/math/calibrated.h (not a per-group policy).
enum Policy : int { kStock = 0, kPreserve = 1, kStochastic = 2, kCalibrated = 3, kNumPolicies = 4 };

// Shapes and options of one dispatch; rows are the E * out rows of w.
struct FuseParams {
  int in_dims;
  int out_dims;
  int rank;
  int groups_per_row;
  int policy;
  float scale;
  uint32_t key;  // stochastic_key(seed)
  int has_k;     // DoRA: row_k holds one rescale factor per row
  int no_nan;    // a, b and scale hold no NaN (see round_to_not_nan)
};

struct GroupArgs {
  float k;             // DoRA row rescale (1 without DoRA)
  uint32_t key;        // stochastic_key(seed)
  uint32_t index0;     // flat index of the group's first element
  int no_nan;          // FuseParams::no_nan
};

#if !defined(__METAL_VERSION__)
// Host side: the parameters of one dispatch from its shapes; `key` is
// stochastic_key(seed). no_nan starts 0 (every rounding checks for NaNs);
// callers that can read a and b set it with inputs_have_no_nan.
inline FuseParams fuse_params(int in_dims, int out_dims, int rank, int groups_per_row, int policy,
                              float scale, uint32_t key, bool has_k) {
  FuseParams p;
  p.in_dims = in_dims;
  p.out_dims = out_dims;
  p.rank = rank;
  p.groups_per_row = groups_per_row;
  p.policy = policy;
  p.scale = scale;
  p.key = key;
  p.has_k = has_k ? 1 : 0;
  p.no_nan = 0;
  return p;
}

// The row-contiguous buffers of one dispatch, as the kernels index them
// (scales and biases in the weight type): the CPU kernels, the Metal grid
// simulation and the standalone harness.
struct CpuBuffers {
  const uint32_t* w_in;
  const void* scales_in;
  const void* biases_in;
  const float* a;
  const float* b;
  const float* magnitude;  // nullptr without DoRA
  uint32_t* w_out;
  void* scales_out;
  void* biases_out;
  const float* prop = nullptr;  // calibrated: P [E, in, in]; nullptr: plain rounding
};

// Whether the scale and n_a + n_b floats of a and b hold no NaN (then the
// kernels may round without NaN checks: see round_to_not_nan).
inline int inputs_have_no_nan(float scale, const float* a, size_t n_a, const float* b, size_t n_b) {
  bool any = scale != scale;
  for (size_t i = 0; i < n_a; ++i) {
    any |= a[i] != a[i];
  }
  for (size_t i = 0; i < n_b; ++i) {
    any |= b[i] != b[i];
  }
  return any ? 0 : 1;
}
#endif

} // namespace pyfuse
