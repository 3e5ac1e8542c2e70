// MLX's affine packing: a group's codes <-> its group_size * bits / 32
// uint32 words (an LSB-first bit stream).
#pragma once

#include "csrc/math/backend.h"

namespace pyfuse {
// Internal linkage: see csrc/math/backend.h.
namespace {

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

} // namespace
} // namespace pyfuse
