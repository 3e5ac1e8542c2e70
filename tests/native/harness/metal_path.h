// The harness's Metal path (metal_path.cpp), declared with forward
// declarations only: that file must include the Metal shim before any of
// pyfuse's math, as the extension's simulation does (csrc/metal_grid.h).
#pragma once

#include <cstdint>

namespace pyfuse {
struct CpuBuffers;
struct FuseParams;
} // namespace pyfuse

namespace harness {

enum DtypeCode : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The Metal kernel source over a simulated grid of n_rows rows.
void run_metal_source(const pyfuse::CpuBuffers& buf, const pyfuse::FuseParams& p, uint32_t n_rows,
                      int32_t dtype, int bits, int group_size);

} // namespace harness
