// What differs between the compilers of the shared math (csrc/fuse_math.h):
// the address-space qualifiers, inline spelling, the math namespace, loop
// unrolling and the largest value of each weight type. Real Metal
// (__METAL_VERSION__), the Metal source compiled as C++ through
// metal/metal_shim.h (PYFUSE_METAL_SHIM), and the CPU kernels (neither).
//
// Every function of the shared math has internal linkage (an unnamed
// namespace in each header): the CPU kernels are compiled once per
// instruction set (csrc/fuse_cpu.cpp), and shared inline symbols would let
// the linker keep one ISA's copy for all.
#pragma once

#if defined(__METAL_VERSION__)
// Real Metal: MLX's kernel utilities give bfloat16_t and Limits<T>.
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/utils.h"
#define PF_DEVICE device
#define PF_THREAD thread
#define PF_CONSTANT constant
#define PF_CONSTANT_REF(T) constant const T&
#define PF_INLINE METAL_FUNC
namespace pf_math = metal;
#else
// C++: the CPU path, and the Metal kernel compiled on Linux through
// metal/metal_shim.h (which defines PYFUSE_METAL_SHIM and `metal::`).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include "mlx/types/half_types.h"
#define PF_DEVICE
#define PF_THREAD
#define PF_CONSTANT
#define PF_CONSTANT_REF(T) const T&
#define PF_INLINE inline
#if defined(PYFUSE_METAL_SHIM)
namespace pf_math = metal;
#else
#include <algorithm>
namespace pf_math = std;
#endif
#endif

// Loops over a group's codes are unrolled fully so that every shift of the
// bit packing is a compile-time constant (and the value loops vectorize).
#if defined(__METAL_VERSION__) || defined(__clang__)
#define PF_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define PF_UNROLL _Pragma("GCC unroll 128")
#else
#define PF_UNROLL
#endif

namespace pyfuse {
namespace {

// The largest finite value of T, where MLX's Metal quantizer starts min.
#if defined(__METAL_VERSION__)
template <typename T>
PF_INLINE float pf_limits_max() {
  return static_cast<float>(Limits<T>::max);
}
#else
template <typename T>
inline float pf_limits_max();
template <>
inline float pf_limits_max<float>() {
  return FLT_MAX;
}
template <>
inline float pf_limits_max<mlx::core::float16_t>() {
  return 65504.0f;
}
template <>
inline float pf_limits_max<mlx::core::bfloat16_t>() {
  return 3.38953139e38f;  // 0x7F7F
}
#endif

} // namespace
} // namespace pyfuse
