// The per-group math of pyfuse's fuse, written ONCE and included by the C++
// CPU path (csrc/fuse_requant.cpp), the Metal kernel (metal/fuse_requant.h)
// and the Linux simulation of that kernel (csrc/metal_sim.cpp).
//
// One "group" is `group_size` consecutive weights of one row, with one
// (scale, bias) pair; MLX's affine packing puts a group in exactly
// group_size * bits / 32 whole uint32 words (an LSB-first bit stream), so
// groups are independent units of work on every backend.
//
// Numerics follow MLX operation by operation (the stock policy must give
// the bytes `mlx_lm fuse` gives):
//  * dequantize: `T(q) * scale + bias` in the weight type T, each operation
//    rounded to T as MLX's CPU ops do (built with -ffp-contract=off so that
//    the compiler never fuses them into an FMA);
//  * delta: sum over k of (scale * b[o, k]) * a[k, i] in float32, k
//    ascending, no FMA: the order of the reference BLAS sgemm that MLX's CPU
//    matmul calls;
//  * quantize: MLX's affine rule; its CPU and Metal quantizers differ (the
//    Metal one starts max at 0 and min at T's max, and rounds half away
//    from zero where the CPU uses rint), selected by `MetalRounding`.
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

// ------------------------------------------------- data shared by backends

enum Policy : int { kStock = 0, kPreserve = 1, kStochastic = 2 };

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

// Everything below has internal linkage (an unnamed namespace): the CPU
// kernels are compiled once per instruction set (csrc/fuse_cpu.cpp), and
// shared inline symbols would let the linker keep one ISA's copy for all.
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


// Rescale factors within 1e-5 of 1 are float32 noise of the row norm (a
// sum of in/group_size * group_size squares, added in another order by
// mx.linalg.norm and by each backend): treated as exactly 1, so a zero DoRA
// delta with unchanged magnitudes is bit-exact. A real DoRA change of the
// row norm by less than 1e-5 is far below any quantization step.
constexpr PF_CONSTANT float kDoraUnitTolerance = 1e-5f;

// ------------------------------------------------------ rounding helpers

// round_to<T>(x): x rounded to the nearest T (ties to even) and widened
// back to float: one T operation's result, as MLX computes T arithmetic
// (in float, then rounded). pf_rint / pf_floor: rint and floor.
//
// round_to_not_nan<T>(x): the same, without the NaN test. Exact for every
// number and for the default NaN that an invalid operation (inf - inf,
// 0 * inf) produces, which stays a NaN; only a NaN carrying a payload could
// come out as another value. The stock values use it when no input holds a
// NaN (FuseParams::no_nan): then every NaN they meet is a default one.
#if defined(__METAL_VERSION__)
template <typename T>
PF_INLINE float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <typename T>
PF_INLINE float round_to_not_nan(float x) {
  return round_to<T>(x);
}
PF_INLINE float pf_rint(float x) {
  return metal::rint(x);
}
PF_INLINE float pf_floor(float x) {
  return metal::floor(x);
}
#else
// Bit-level versions: the x86-64 baseline (no SSE4.1, no F16C) has no
// instruction for rint or half conversion, and library calls would cost
// more than the rest of the fuse. Each is exact: tests compare every
// result with MLX's own types.
PF_INLINE uint32_t pf_bits(float x) {
  return __builtin_bit_cast(uint32_t, x);
}
PF_INLINE float pf_from_bits(uint32_t u) {
  return __builtin_bit_cast(float, u);
}
#if defined(__SSE4_1__) || defined(__aarch64__)
// One instruction (roundps / frintn), and it vectorizes.
PF_INLINE float pf_rint(float x) {
  return __builtin_rintf(x);
}
#else
// Round to nearest even integer for |x| < 2^23 by the 2^23 trick (larger
// floats are integers already). Needs default rounding and no fast-math.
PF_INLINE float pf_rint(float x) {
  const float big = 8388608.0f;
  float ax = __builtin_fabsf(x);
  float r = (ax + big) - big;
  r = __builtin_copysignf(r, x);
  return ax < big ? r : x;
}
#endif
PF_INLINE float pf_floor(float x) {
  float r = pf_rint(x);
  return r > x ? r - 1.0f : r;
}
template <typename T>
PF_INLINE float round_to_not_nan(float x);
template <>
PF_INLINE float round_to_not_nan<float>(float x) {
  return x;
}
template <>
PF_INLINE float round_to_not_nan<mlx::core::bfloat16_t>(float x) {
  // Ties to even on the 16 dropped bits (a default NaN keeps its bits).
  uint32_t u = pf_bits(x);
  return pf_from_bits((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
template <>
PF_INLINE float round_to_not_nan<mlx::core::float16_t>(float x) {
  // IEEE float -> half (ties to even) -> float, as MLX's conversion does.
  float ax = __builtin_fabsf(x);
  // Normal halves: keep 10 mantissa bits (ties to even on the dropped 13).
  uint32_t u = pf_bits(ax);
  float normal = pf_from_bits((u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);
  // Subnormal halves (|x| < 2^-14): multiples of 2^-24; scaling by powers
  // of two is exact.
  float sub = pf_rint(ax * 16777216.0f) * (1.0f / 16777216.0f);
  float r = ax < 6.103515625e-05f ? sub : normal;
  r = ax >= 65520.0f ? __builtin_inff() : r;  // rounds past the largest half
  return __builtin_copysignf(r, x);  // a default NaN: `normal` keeps it a NaN
}
template <typename T>
PF_INLINE float round_to(float x) {
  return x != x ? x : round_to_not_nan<T>(x);
}
template <>
PF_INLINE float round_to<mlx::core::bfloat16_t>(float x) {
  // MLX's float -> bfloat16 turns every NaN into 0x7FC0.
  return x != x ? pf_from_bits(0x7FC00000u) : round_to_not_nan<mlx::core::bfloat16_t>(x);
}
#endif

// ---------------------------------------------------------------- packing

// Codes travel in packs of 8: 8 codes of `bits` bits are exactly `bits`
// bytes of MLX's LSB-first stream, for every supported width. A pack is
// spread to (or gathered from) one code per byte of a 64-bit word by three
// shift-and-mask steps (SWAR), branch-free and with constant shifts, which
// is several times cheaper than a shift per code on the CPU.
PF_INLINE uint64_t lanes(int width, int n) {
  // n low bits set in every `width`-bit lane of a 64-bit word
  uint64_t lane = (n >= 64) ? ~uint64_t(0) : ((uint64_t(1) << n) - 1);
  uint64_t m = 0;
  for (int at = 0; at < 64; at += width) {
    m |= lane << at;
  }
  return m;
}

// 8 bytes <-> one 64-bit word, little-endian (one move on the CPU).
PF_INLINE uint64_t load_u64(const PF_THREAD uint8_t* p) {
#if defined(__METAL_VERSION__)
  uint64_t v = 0;
  for (int k = 0; k < 8; ++k) {
    v |= uint64_t(p[k]) << (8 * k);
  }
  return v;
#else
  uint64_t v;
  __builtin_memcpy(&v, p, 8);
  return v;
#endif
}
PF_INLINE void store_u64(uint64_t v, PF_THREAD uint8_t* p) {
#if defined(__METAL_VERSION__)
  for (int k = 0; k < 8; ++k) {
    p[k] = uint8_t(v >> (8 * k));
  }
#else
  __builtin_memcpy(p, &v, 8);
#endif
}

template <int bits, typename U>
PF_INLINE U spread_pack(U x) {
  constexpr int b = bits;
  U v = (x & lanes(64, 4 * b)) | (((x >> (4 * b)) & lanes(64, 4 * b)) << 32);
  v = (v & lanes(32, 2 * b)) | (((v >> (2 * b)) & lanes(32, 2 * b)) << 16);
  v = (v & lanes(16, b)) | (((v >> b) & lanes(16, b)) << 8);
  return v;  // byte k holds code k
}

template <int bits, typename U>
PF_INLINE U gather_pack(U v) {
  constexpr int b = bits;  // byte k of v holds code k (< 2^bits)
  v = (v & lanes(16, 8)) | (((v >> 8) & lanes(16, 8)) << b);
  v = (v & lanes(32, 16)) | (((v >> 16) & lanes(32, 16)) << (2 * b));
  v = (v & lanes(64, 32)) | ((v >> 32) << (4 * b));
  return v;  // the pack's 8 * bits bits
}

// A code in a group's working array: one byte per code on Metal (thread
// memory is scarce), one int32 lane per code in C++, which the value loops
// and table lookups use directly and which packs of at most 4 bits spread
// into with per-lane shifts.
#if defined(__METAL_VERSION__)
typedef uint8_t pf_code;
#else
typedef int32_t pf_code;
typedef uint32_t pf_u32x8 __attribute__((vector_size(32)));
typedef uint64_t pf_u64x4 __attribute__((vector_size(32)));

// {0, b, 2b, ..., 7b}: where each code of a pack of width b <= 4 starts.
template <int bits>
PF_INLINE pf_u32x8 pack_shifts() {
  return pf_u32x8{0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits};
}
#endif

// The group's codes, from its words (an LSB-first bit stream).
template <int bits, int group_size>
PF_INLINE void unpack_group(const PF_DEVICE uint32_t* words, PF_THREAD pf_code* codes) {
  constexpr int n_bytes = group_size * bits / 8;
#if defined(__METAL_VERSION__)
  const PF_DEVICE uint8_t* bytes = reinterpret_cast<const PF_DEVICE uint8_t*>(words);
  for (int p = 0; p < group_size / 8; ++p) {
    uint64_t x = 0;
    for (int t = 0; t < bits; ++t) {
      x |= uint64_t(bytes[p * bits + t]) << (8 * t);
    }
    store_u64(spread_pack<bits>(x), codes + 8 * p);
  }
#else
  // One load per pack straight from the words (a staging copy would stall
  // the loads on store forwarding): a window of 4 (or 8) bytes holding the
  // pack, moved back to stay inside the group at its end, shifted to it.
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);
  if constexpr (bits <= 4) {
    // A pack fits in 32 bits: broadcast it and shift each lane to its code.
    PF_UNROLL
    for (int p = 0; p < group_size / 8; ++p) {
      const int at = p * bits <= n_bytes - 4 ? p * bits : n_bytes - 4;
      uint32_t x;
      __builtin_memcpy(&x, bytes + at, sizeof(x));
      x >>= 8 * (p * bits - at);
      pf_u32x8 v = (pf_u32x8{} + x) >> pack_shifts<bits>();
      v &= (1u << bits) - 1u;
      __builtin_memcpy(codes + 8 * p, &v, sizeof(v));
    }
  } else {
    // Wider packs: spread four packs per step to one code per byte (SWAR
    // on a vector of four 64-bit words), then widen.
    uint8_t narrow[group_size];
    PF_UNROLL
    for (int p = 0; p < group_size / 8; p += 4) {
      pf_u64x4 v;
      for (int l = 0; l < 4; ++l) {
        const int at = (p + l) * bits <= n_bytes - 8 ? (p + l) * bits : n_bytes - 8;
        v[l] = load_u64(bytes + at) >> (8 * ((p + l) * bits - at));
      }
      v = spread_pack<bits>(v);
      __builtin_memcpy(narrow + 8 * p, &v, sizeof(v));
    }
    for (int j = 0; j < group_size; ++j) {
      codes[j] = narrow[j];
    }
  }
#endif
}

// Packs `group_size` codes (each < 2^bits) into the group's words.
template <int bits, int group_size>
PF_INLINE void pack_group(const PF_THREAD pf_code* codes, PF_DEVICE uint32_t* words) {
  constexpr int n_bytes = group_size * bits / 8;
#if defined(__METAL_VERSION__)
  PF_DEVICE uint8_t* bytes = reinterpret_cast<PF_DEVICE uint8_t*>(words);
  for (int p = 0; p < group_size / 8; ++p) {
    const uint64_t x = gather_pack<bits>(load_u64(codes + 8 * p));
    for (int t = 0; t < bits; ++t) {
      bytes[p * bits + t] = uint8_t(x >> (8 * t));
    }
  }
#else
  // Narrow to one code per byte, gather four packs per step (SWAR on a
  // vector of four 64-bit words), then append the packs to a 64-bit
  // accumulator that is stored whenever it fills (no staging buffer: its
  // reloads would stall on store forwarding). Unrolled, every shift and
  // branch on `fill` is a constant.
  uint8_t narrow[group_size];
  for (int j = 0; j < group_size; ++j) {
    narrow[j] = uint8_t(codes[j]);
  }
  uint8_t* out = reinterpret_cast<uint8_t*>(words);
  uint64_t acc = 0;
  int fill = 0;  // bits in acc, always < 64 here
  PF_UNROLL
  for (int p = 0; p < group_size / 8; p += 4) {
    pf_u64x4 v;
    __builtin_memcpy(&v, narrow + 8 * p, sizeof(v));
    v = gather_pack<bits>(v);
    for (int l = 0; l < 4; ++l) {
      const uint64_t x = v[l];  // 8 * bits bits
      acc |= x << fill;
      fill += 8 * bits;
      if (fill >= 64) {
        store_u64(acc, out);
        out += 8;
        fill -= 64;
        acc = fill > 0 ? x >> (8 * bits - fill) : 0;
      }
    }
  }
  if (fill > 0) {
    __builtin_memcpy(out, &acc, size_t(fill / 8));
  }
  (void)n_bytes;
#endif
}

// ------------------------------------------------------------ the values

// delta[j] for inputs i0 .. i0+group_size-1 of row o: `b_row` is b[o, :],
// `a` points at a[0, i0] with row stride `in_dims`; scale * b[o, k] is
// rounded to float first, as mlx-lm computes (scale * b) @ a.
template <int group_size>
PF_INLINE void group_delta(
    float scale,
    const PF_DEVICE float* b_row,
    const PF_DEVICE float* a,
    int rank,
    int in_dims,
    PF_THREAD float* delta) {
  for (int j = 0; j < group_size; ++j) {
    delta[j] = 0.0f;
  }
  for (int k = 0; k < rank; ++k) {
    const float sb = scale * b_row[k];
    const PF_DEVICE float* ak = a + k * in_dims;
    for (int j = 0; j < group_size; ++j) {
      float p = sb * ak[j];  // separate statements: never an FMA
      delta[j] = delta[j] + p;
    }
  }
}

// MLX's dequantized weight T(T(q) * s) + b, each operation rounded to T.
template <typename T>
PF_INLINE float dequantized(float q, float s, float b) {
  return round_to<T>(round_to<T>(q * s) + b);
}

// Variable vector shuffles (GCC's __builtin_shuffle) compile to one or two
// permute instructions with AVX2 and later; elsewhere values are computed
// code by code.
#if !defined(__METAL_VERSION__) && !defined(__clang__) && defined(__GNUC__) && defined(__AVX2__)
#define PF_VECTOR_TABLE 1
#else
#define PF_VECTOR_TABLE 0
#endif

// The stock fused weight `dequantize(q) + T(delta)`, every operation
// rounded to T as MLX's ops do: T(T(T(q) * s) + b) + T(delta). `no_nan`:
// see round_to_not_nan.
template <typename T, int bits, int group_size>
PF_INLINE void stock_values(
    const PF_DEVICE uint32_t* words,
    T scale,
    T bias,
    const PF_THREAD float* delta,
    bool no_nan,
    PF_THREAD float* values) {
  const float s = static_cast<float>(scale);
  const float b = static_cast<float>(bias);
  pf_code codes[group_size];
  unpack_group<bits, group_size>(words, codes);
#if PF_VECTOR_TABLE
  if constexpr ((1 << bits) <= 16) {
    // Few codes: dequantize each possible code once (a vector or two), then
    // look the group's codes up with variable shuffles (vpermps and kin).
    typedef float f8 __attribute__((vector_size(32)));
    typedef int32_t i8 __attribute__((vector_size(32)));
    constexpr int n_codes = 1 << bits;
    float table[16] = {};
#pragma GCC unroll 1  // kept a loop, so that it vectorizes
    for (int q = 0; q < n_codes; ++q) {
      table[q] = dequantized<T>(float(q), s, b);
    }
    f8 lo, hi;
    __builtin_memcpy(&lo, table, sizeof(f8));
    __builtin_memcpy(&hi, table + 8, sizeof(f8));
    for (int j = 0; j < group_size; j += 8) {
      i8 idx;
      __builtin_memcpy(&idx, codes + j, sizeof(idx));
      f8 w = n_codes <= 8 ? __builtin_shuffle(lo, idx) : __builtin_shuffle(lo, hi, idx);
      __builtin_memcpy(values + j, &w, sizeof(w));
    }
  } else
#endif
  {
    for (int j = 0; j < group_size; ++j) {
      values[j] = dequantized<T>(float(int(codes[j])), s, b);
    }
  }
  if (no_nan) {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to_not_nan<T>(values[j] + round_to_not_nan<T>(delta[j]));
    }
  } else {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to<T>(values[j] + round_to<T>(delta[j]));
    }
  }
}

// ------------------------------------------------------------- quantizing

// Folds the group's values into (w_min, w_max), which come in holding the
// starting values. Min and max do not depend on the order of the values (the
// sign of a zero extreme changes nothing downstream), so C++ takes eight
// lanes at a time with GCC/clang vector extensions, which compilers do not
// derive from the scalar loop; Metal runs the scalar loop per thread.
template <int group_size>
PF_INLINE void group_extremes(const PF_THREAD float* values, PF_THREAD float& w_min, PF_THREAD float& w_max) {
#if defined(__METAL_VERSION__)
  for (int j = 0; j < group_size; ++j) {
    w_max = metal::max(w_max, values[j]);
    w_min = metal::min(w_min, values[j]);
  }
#else
  typedef float f8 __attribute__((vector_size(32)));
  f8 lo = {w_min, w_min, w_min, w_min, w_min, w_min, w_min, w_min};
  f8 hi = {w_max, w_max, w_max, w_max, w_max, w_max, w_max, w_max};
  for (int j = 0; j < group_size; j += 8) {
    f8 v;
    __builtin_memcpy(&v, values + j, sizeof(v));
    lo = v < lo ? v : lo;
    hi = hi < v ? v : hi;
  }
  // Halve the lanes three times (vector min/max), then fold in the start.
  typedef float f4 __attribute__((vector_size(16)));
  f4 lo4, hi4, lo_hi, hi_hi;
  __builtin_memcpy(&lo4, &lo, sizeof(f4));
  __builtin_memcpy(&lo_hi, reinterpret_cast<const char*>(&lo) + sizeof(f4), sizeof(f4));
  __builtin_memcpy(&hi4, &hi, sizeof(f4));
  __builtin_memcpy(&hi_hi, reinterpret_cast<const char*>(&hi) + sizeof(f4), sizeof(f4));
  lo4 = lo_hi < lo4 ? lo_hi : lo4;
  hi4 = hi4 < hi_hi ? hi_hi : hi4;
  const float lo2[2] = {lo4[0] < lo4[2] ? lo4[0] : lo4[2], lo4[1] < lo4[3] ? lo4[1] : lo4[3]};
  const float hi2[2] = {hi4[0] < hi4[2] ? hi4[2] : hi4[0], hi4[1] < hi4[3] ? hi4[3] : hi4[1]};
  const float lo1 = lo2[0] < lo2[1] ? lo2[0] : lo2[1];
  const float hi1 = hi2[0] < hi2[1] ? hi2[1] : hi2[0];
  w_min = lo1 < w_min ? lo1 : w_min;
  w_max = w_max < hi1 ? hi1 : w_max;
#endif
}

// The rounding of MLX's quantizer: rint on the CPU, round (half away from
// zero) on Metal. A struct, not a ternary: Metal's C++ has no `if
// constexpr`, and a call left in the loop body would stop vectorization.
template <bool MetalRounding>
struct GridRound {
  static PF_INLINE float apply(float t) {
    return pf_rint(t);
  }
};
template <>
struct GridRound<true> {
  static PF_INLINE float apply(float t) {
    return pf_math::round(t);
  }
};

// MLX's affine rule: the (scale, bias) that put the group's extreme of
// larger magnitude exactly on the grid.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fit_affine(const PF_THREAD float* values, PF_THREAD float& scale, PF_THREAD float& bias) {
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  float w_min;
  float w_max;
  if (MetalRounding) {
    w_min = static_cast<float>(pf_limits_max<T>());
    w_max = 0.0f;
  } else {
    w_min = INFINITY;
    w_max = -w_min;
  }
  group_extremes<group_size>(values, w_min, w_max);
  const bool mask = pf_math::abs(w_min) > pf_math::abs(w_max);
  float s = pf_math::max((w_max - w_min) / n_bins, eps);
  s = mask ? s : -s;
  const float edge = mask ? w_min : w_max;
  const float q0 = GridRound<MetalRounding>::apply(edge / s);
  bias = 0.0f;
  if (q0 != 0.0f) {
    s = edge / q0;
    bias = edge;
  }
  scale = s;
}

// Nearest codes on the (scale, bias) grid, clamped to [0, 2^bits - 1].
template <int bits, int group_size, bool MetalRounding>
PF_INLINE void round_to_grid(
    const PF_THREAD float* values, float scale, float bias, PF_THREAD pf_code* codes) {
  for (int j = 0; j < group_size; ++j) {
    float t = (values[j] - bias) / scale;
    // Clamped as an integer (t is an integer-valued float well inside
    // int range: the grid spans the group's values), which vectorizes.
    int q = int(GridRound<MetalRounding>::apply(t));
    q = q < 0 ? 0 : q;
    codes[j] = pf_code(q > (1 << bits) - 1 ? (1 << bits) - 1 : q);
  }
}

// ------------------------------------------------------- stochastic hash

// lowbias32 (C. Wellons): a counter-based hash, identical on every backend.
PF_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

PF_INLINE uint32_t stochastic_key(uint32_t seed) {
  return lowbias32(lowbias32(seed) ^ 0x9e3779b9u);
}

// u in [0, 1) for the element with flat index `index` in the whole tensor.
PF_INLINE float stochastic_uniform(uint32_t key, uint32_t index) {
  return float(lowbias32(index ^ key) >> 8) * (1.0f / 16777216.0f);
}

// floor(t + u) as if computed exactly: the float sum t + u rounds up to the
// next integer when u is within float spacing of 1 (a few codes per million
// at 8 bits), which would move codes even for a zero delta. Splitting t into
// its integer part and fraction keeps a zero delta (fraction 0) exact.
PF_INLINE float stochastic_round(float t, float u) {
  const float whole = pf_floor(t);
  const float frac = t - whole;  // exact
  return u >= 1.0f - frac ? whole + 1.0f : whole;
}

// ----------------------------------------------------------- one group

// The stock policy in two halves, so that the CPU can batch groups
// (csrc/fuse_cpu.cpp): the next groups' values are computed while one
// group's fit (a chain of divisions) completes.
// 1. The fused values (DoRA-rescaled by k) and their affine fit.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void stock_fit(
    const PF_DEVICE uint32_t* words_in,
    T scale_in,
    T bias_in,
    const PF_THREAD float* delta,
    GroupArgs args,
    PF_THREAD float* values,
    PF_THREAD float& scale,
    PF_THREAD float& bias) {
  stock_values<T, bits, group_size>(words_in, scale_in, bias_in, delta, args.no_nan != 0, values);
  if (args.k != 1.0f) {
    for (int j = 0; j < group_size; ++j) {
      values[j] = round_to<T>(args.k * values[j]);
    }
  }
  fit_affine<T, bits, group_size, MetalRounding>(values, scale, bias);
}

// 2. The codes on that grid, packed, and the grid in T.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void stock_store(
    const PF_THREAD float* values,
    float scale,
    float bias,
    PF_DEVICE uint32_t* words_out,
    PF_DEVICE T* scale_out,
    PF_DEVICE T* bias_out) {
  pf_code codes[group_size];
  round_to_grid<bits, group_size, MetalRounding>(values, scale, bias, codes);
  pack_group<bits, group_size>(codes, words_out);
  *scale_out = static_cast<T>(scale);
  *bias_out = static_cast<T>(bias);
}

// Fuses one group. `delta` holds the group's float32 delta. Writes the
// group's packed words and its (scale, bias) in T.
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fuse_group(
    int policy,
    const PF_DEVICE uint32_t* words_in,
    T scale_in,
    T bias_in,
    const PF_THREAD float* delta,
    GroupArgs args,
    PF_DEVICE uint32_t* words_out,
    PF_DEVICE T* scale_out,
    PF_DEVICE T* bias_out) {
  const float n_bins = float((1 << bits) - 1);
  float values[group_size];
  pf_code codes[group_size];
  float scale;
  float bias;

  if (policy == kStock) {
    stock_fit<T, bits, group_size, MetalRounding>(words_in, scale_in, bias_in, delta, args, values, scale, bias);
    stock_store<T, bits, group_size, MetalRounding>(values, scale, bias, words_out, scale_out, bias_out);
    return;
  }

  // preserve / stochastic: move each code by the delta measured in steps of
  // the group's own grid; a zero delta leaves every code as it was.
  const bool stochastic = policy == kStochastic;
  const float s = static_cast<float>(scale_in);
  const float b = static_cast<float>(bias_in);
  pf_code old_codes[group_size];
  unpack_group<bits, group_size>(words_in, old_codes);
  float steps[group_size];  // the new codes, before the range check
  for (int j = 0; j < group_size; ++j) {
    const float q = float(int(old_codes[j]));
    float step = delta[j] / s;
    steps[j] = q + step;
  }
  if (stochastic) {
    for (int j = 0; j < group_size; ++j) {
      steps[j] = stochastic_round(steps[j], stochastic_uniform(args.key, args.index0 + uint32_t(j)));
    }
  } else {
    for (int j = 0; j < group_size; ++j) {
      steps[j] = pf_rint(steps[j]);
    }
  }
  int out_of_range = 0;
  for (int j = 0; j < group_size; ++j) {
    out_of_range |= int(steps[j] < 0.0f) | int(steps[j] > n_bins);
  }
  const bool in_range = out_of_range == 0;
  if (in_range) {
    for (int j = 0; j < group_size; ++j) {
      codes[j] = pf_code(int(steps[j]));
    }
    pack_group<bits, group_size>(codes, words_out);
    if (args.k != 1.0f) {
      *scale_out = static_cast<T>(s * args.k);
      *bias_out = static_cast<T>(b * args.k);
    } else {
      *scale_out = scale_in;
      *bias_out = bias_in;
    }
    return;
  }

  // Re-fit: the delta left the grid's range. MLX's affine rule (CPU
  // flavour on every backend: this policy is pyfuse's own and must agree
  // everywhere) on the float32 fused values.
  for (int j = 0; j < group_size; ++j) {
    const float q = float(int(old_codes[j]));
    float x = q * s;
    x = x + b;
    x = x + delta[j];
    values[j] = x * args.k;
  }
  fit_affine<float, bits, group_size, false>(values, scale, bias);
  if (stochastic) {
    for (int j = 0; j < group_size; ++j) {
      float t = (values[j] - bias) / scale;
      t = stochastic_round(t, stochastic_uniform(args.key, args.index0 + uint32_t(j)));
      t = t < 0.0f ? 0.0f : t;
      t = t > n_bins ? n_bins : t;
      codes[j] = pf_code(int(t));
    }
  } else {
    round_to_grid<bits, group_size, false>(values, scale, bias, codes);
  }
  pack_group<bits, group_size>(codes, words_out);
  *scale_out = static_cast<T>(scale);
  *bias_out = static_cast<T>(bias);
}

// Sum of squares of the stock fused row values of one group (DoRA norms).
template <typename T, int bits, int group_size>
PF_INLINE float group_sumsq(
    const PF_DEVICE uint32_t* words, T scale, T bias, const PF_THREAD float* delta, bool no_nan) {
  float values[group_size];
  stock_values<T, bits, group_size>(words, scale, bias, delta, no_nan, values);
  float acc = 0.0f;
  for (int j = 0; j < group_size; ++j) {
    float sq = values[j] * values[j];
    acc = acc + sq;
  }
  return acc;
}

// The DoRA factor magnitude / ||row||, snapped to 1 within float noise.
PF_INLINE float dora_factor(float magnitude, float sumsq) {
  float k = magnitude / pf_math::sqrt(sumsq);
  return pf_math::abs(k - 1.0f) <= kDoraUnitTolerance ? 1.0f : k;
}

// ------------------------------------------- indexing shared by backends


// The float32 delta of group `g` of row `row` (rows are E * out, expert-major).
template <int group_size>
PF_INLINE void group_delta_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    uint32_t g,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    PF_THREAD float* delta) {
  const uint32_t expert = row / uint32_t(p.out_dims);
  group_delta<group_size>(
      p.scale,
      b + size_t(row) * p.rank,
      a + size_t(expert) * p.rank * p.in_dims + size_t(g) * group_size,
      p.rank,
      p.in_dims,
      delta);
}

// The per-group arguments of group `g` of row `row`.
template <int group_size>
PF_INLINE GroupArgs group_args(PF_CONSTANT_REF(FuseParams) p, uint32_t row, uint32_t g, const PF_DEVICE float* row_k) {
  GroupArgs args;
  args.k = p.has_k ? row_k[row] : 1.0f;
  args.key = p.key;
  args.index0 = row * uint32_t(p.in_dims) + g * uint32_t(group_size);
  args.no_nan = p.no_nan;
  return args;
}

// Fuses group `g` of row `row` (the unit of work of every backend).
template <typename T, int bits, int group_size, bool MetalRounding>
PF_INLINE void fuse_group_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    uint32_t g,
    const PF_DEVICE uint32_t* w_in,
    const PF_DEVICE T* scales_in,
    const PF_DEVICE T* biases_in,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    const PF_DEVICE float* row_k,
    PF_DEVICE uint32_t* w_out,
    PF_DEVICE T* scales_out,
    PF_DEVICE T* biases_out) {
  constexpr int words_per_group = group_size * bits / 32;
  const uint32_t sg = row * uint32_t(p.groups_per_row) + g;
  const uint32_t wo = sg * uint32_t(words_per_group);
  float delta[group_size];
  group_delta_at<group_size>(p, row, g, a, b, delta);
  const GroupArgs args = group_args<group_size>(p, row, g, row_k);
  fuse_group<T, bits, group_size, MetalRounding>(
      p.policy, w_in + wo, scales_in[sg], biases_in[sg], delta, args,
      w_out + wo, scales_out + sg, biases_out + sg);
}

// The DoRA factor of row `row`: magnitude[row] / ||stock fused row||.
template <typename T, int bits, int group_size>
PF_INLINE float row_factor_at(
    PF_CONSTANT_REF(FuseParams) p,
    uint32_t row,
    const PF_DEVICE uint32_t* w_in,
    const PF_DEVICE T* scales_in,
    const PF_DEVICE T* biases_in,
    const PF_DEVICE float* a,
    const PF_DEVICE float* b,
    const PF_DEVICE float* magnitude) {
  constexpr int words_per_group = group_size * bits / 32;
  float sumsq = 0.0f;
  for (int g = 0; g < p.groups_per_row; ++g) {
    const uint32_t sg = row * uint32_t(p.groups_per_row) + uint32_t(g);
    float delta[group_size];
    group_delta_at<group_size>(p, row, uint32_t(g), a, b, delta);
    float part = group_sumsq<T, bits, group_size>(
        w_in + size_t(sg) * words_per_group, scales_in[sg], biases_in[sg], delta, p.no_nan != 0);
    sumsq = sumsq + part;
  }
  return dora_factor(magnitude[row], sumsq);
}

} // namespace
} // namespace pyfuse
