// Which build of the CPU kernels runs: csrc/fuse_cpu.cpp is compiled once
// per instruction set (CMakeLists.txt), and the widest one this processor
// (and its OS) supports is chosen at run time, so that one wheel runs on
// every machine of its platform. Tests and benchmarks can force a narrower
// one to check and measure every build on one machine.
#pragma once

#include <string>
#include <vector>

#include "csrc/fuse_cpu.h"

namespace pyfuse {

// Names of the kernel builds in this binary that this processor runs,
// narrowest first ("baseline", then "avx2", "avx512" on x86-64).
std::vector<std::string> available_cpu_kernels();

// The build in use: the forced one, else the widest available.
std::string active_cpu_kernels();

// Forces a build by name, or "auto" (the widest); std::invalid_argument for
// a name that is not available here.
void set_cpu_kernels(const std::string& name);

// The kernel of the active build for one dtype x bits x group size.
RowsFn select_rows_fn(mlx::core::Dtype dtype, int bits, int group_size, bool metal_rounding);

} // namespace pyfuse
