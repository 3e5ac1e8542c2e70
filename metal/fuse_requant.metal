// Instantiations only (the kernels live in fuse_requant.h and
// fuse_calibrated.h): one trio per
// dtype x group size x bits, named `<kernel>_<type>_gs_<G>_b_<B>`.
// clang-format off
#include "mlx/backend/metal/kernels/utils.h"
#include "metal/fuse_requant.h"
#include "metal/fuse_calibrated.h"

#define instantiate_fuse(type_name, type, gs, b)                                   \
  instantiate_kernel("fuse_requant_" #type_name "_gs_" #gs "_b_" #b,               \
                     fuse_requant, type, gs, b)                                   \
  instantiate_kernel("fuse_requant_row_factor_" #type_name "_gs_" #gs "_b_" #b,    \
                     fuse_requant_row_factor, type, gs, b)                        \
  instantiate_kernel("fuse_calibrated_" #type_name "_gs_" #gs "_b_" #b,            \
                     fuse_calibrated, type, gs, b)

#define instantiate_fuse_bits(type_name, type, gs) \
  instantiate_fuse(type_name, type, gs, 2)         \
  instantiate_fuse(type_name, type, gs, 3)         \
  instantiate_fuse(type_name, type, gs, 4)         \
  instantiate_fuse(type_name, type, gs, 5)         \
  instantiate_fuse(type_name, type, gs, 6)         \
  instantiate_fuse(type_name, type, gs, 8)

#define instantiate_fuse_type(type_name, type) \
  instantiate_fuse_bits(type_name, type, 32)   \
  instantiate_fuse_bits(type_name, type, 64)   \
  instantiate_fuse_bits(type_name, type, 128)

instantiate_fuse_type(float32, float)
instantiate_fuse_type(float16, half)
instantiate_fuse_type(bfloat16, bfloat16_t)
// clang-format on
