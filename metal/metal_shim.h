// Lets the Metal kernel source (metal/fuse_requant.h) compile as C++ on
// Linux, where no Metal compiler exists: address-space qualifiers become
// nothing, vector index types become small structs, and `metal::` maps the
// few functions the kernels use onto <cmath>. Unknown attributes such as
// [[kernel]] and [[buffer(n)]] are ignored by the C++ compiler
// (-Wno-attributes). half and bfloat are MLX's own CPU types, whose
// arithmetic rounds after every operation as Metal's does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#define PYFUSE_METAL_SHIM 1
#define device
#define constant
#define thread

struct uint2 {
  uint32_t x;
  uint32_t y;
};
using uint = uint32_t;

namespace metal {
inline float rint(float x) { return std::rint(x); }
inline float round(float x) { return std::round(x); }  // half away from zero, as Metal
inline float floor(float x) { return std::floor(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float min(float x, float y) { return std::min(x, y); }
inline float max(float x, float y) { return std::max(x, y); }
} // namespace metal
