// The harness's Metal path: the kernel source of metal/fuse_requant.h,
// compiled as C++ through metal/metal_shim.h (csrc/metal_grid.h).
#include "metal_path.h"

#include <stdexcept>

#include "mlx/types/half_types.h"

// Last: it brings in the Metal shim.
#include "csrc/metal_grid.h"

namespace harness {

namespace {

template <typename T>
void run_typed(const pyfuse::CpuBuffers& buf, const pyfuse::FuseParams& p, uint32_t n_rows, int bits,
               int group_size) {
#define PYFUSE_CASE(B, G) \
  if (bits == B && group_size == G) return pyfuse::run_metal_grid<T, G, B>(buf, p, n_rows);
  PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
#undef PYFUSE_CASE
  throw std::invalid_argument("[math_harness] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
}

} // namespace

void run_metal_source(const pyfuse::CpuBuffers& buf, const pyfuse::FuseParams& p, uint32_t n_rows,
                      int32_t dtype, int bits, int group_size) {
  if (dtype == kFloat32) return run_typed<float>(buf, p, n_rows, bits, group_size);
  if (dtype == kFloat16) return run_typed<mlx::core::float16_t>(buf, p, n_rows, bits, group_size);
  return run_typed<mlx::core::bfloat16_t>(buf, p, n_rows, bits, group_size);
}

} // namespace harness
