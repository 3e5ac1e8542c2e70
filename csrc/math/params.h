// The data every backend shares: the policies, the parameters of one
// dispatch (passed to Metal as one constant buffer, so its layout is the
// same for the host and the GPU) and the per-group arguments.
#pragma once

#include "csrc/math/backend.h"

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

} // namespace pyfuse
