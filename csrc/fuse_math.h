// The per-group math of pyfuse's fuse, written ONCE and included by the C++
// CPU kernels (csrc/fuse_cpu.cpp), the fidelity sums (csrc/fidelity.cpp),
// the Metal kernel (metal/fuse_requant.h) and the Linux simulation of that
// kernel (csrc/metal_sim.cpp). One header to include; the math itself is
// split by concern under csrc/math/:
//
//   backend.h     what differs between Metal, the Metal shim and the CPU
//   params.h      policies, the parameters of one dispatch, per-group args
//   round.h       rounding to a weight type, rint and floor
//   pack.h        MLX's affine packing of codes into uint32 words
//   values.h      the LoRA delta and the dequantized, fused values
//   quantize.h    MLX's affine quantizer (CPU and Metal rounding)
//   stochastic.h  the counter-based hash and stochastic rounding
//   fuse_group.h  the fuse of one group under each policy, DoRA factor
//   indexing.h    where a group lives in a dispatch: per-group entry points
//   dispatch.h    (host only) the supported bits x group sizes, from
//                 pyfuse/options.py, that every kernel table instantiates
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

#include "csrc/math/backend.h"
#include "csrc/math/params.h"
#include "csrc/math/round.h"
#include "csrc/math/pack.h"
#include "csrc/math/values.h"
#include "csrc/math/quantize.h"
#include "csrc/math/stochastic.h"
#include "csrc/math/fuse_group.h"
#include "csrc/math/indexing.h"
#if !defined(__METAL_VERSION__)
#include "csrc/math/dispatch.h"
#endif
