// Host side only: from the run-time (bits, group size) of a call to the
// kernel instantiated for them at compile time. The supported values come
// from pyfuse/options.py through the header CMake generates from it
// (csrc/options.h in the build tree), so the CPU kernels, the fidelity sums
// and the Metal simulation instantiate exactly the list Python accepts:
//
//   #define PYFUSE_CASE(B, G) if (bits == B && group_size == G) return &kernel<B, G>;
//   PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
//   throw std::invalid_argument("[who] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
//
// One flat chain of returns and a literal message, not a template or
// lambda dispatch nor a message built at run time: GCC's inlining of the
// kernels depends on the whole translation unit, and any of those changed
// the kernels' machine code (this shape keeps the code they were measured
// with, function for function). The Metal library's instantiations
// (metal/fuse_requant.metal) are spelled out for Apple's compiler; a test
// checks them against the same list.
#pragma once

#include <stdexcept>

#include "csrc/options.h"

#define PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE                                     \
  "unsupported bits/group_size; supported: bits " PYFUSE_SUPPORTED_BITS \
  ", group sizes " PYFUSE_SUPPORTED_GROUP_SIZES
