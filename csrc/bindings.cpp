// nanobind bindings of pyfuse._ext. Python (pyfuse/kernel/ops.py) checks arguments
// first; the C++ checks raise std::invalid_argument, which nanobind turns
// into ValueError, so a bad call never crashes the process.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "csrc/cpu_isa.h"
#include "csrc/fidelity.h"
#include "csrc/fuse_requant.h"
#include "csrc/metal_sim.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "pyfuse native kernels (CPU; Metal when MLX was built with Metal)";
  // The MLX version this binary was compiled against: pyfuse/kernel/native.py
  // refuses to use it with any other (C++ ABI).
  m.attr("mlx_version") = mx::version();
#ifdef _METAL_
  m.attr("has_metal") = true;
#else
  m.attr("has_metal") = false;
#endif

  m.def(
      "fuse_requant",
      [](const mx::array& w, const mx::array& scales, const mx::array& biases, const mx::array& a,
         const mx::array& b, float scale, int group_size, int bits, const std::string& policy,
         uint32_t seed, const std::optional<mx::array>& magnitude, bool metal_rules,
         mx::StreamOrDevice stream, const std::optional<mx::array>& prop) {
        return pyfuse::fuse_requant(
            w, scales, biases, a, b, scale, group_size, bits, policy, seed, magnitude,
            metal_rules ? pyfuse::Rounding::Metal : pyfuse::Rounding::Native, stream, prop);
      },
      "w"_a, "scales"_a, "biases"_a, "a"_a, "b"_a, nb::kw_only(), "scale"_a = 1.0f,
      "group_size"_a = 64, "bits"_a = 4, "policy"_a = "stock", "seed"_a = 0,
      "magnitude"_a = nb::none(), "metal_rules"_a = false, "stream"_a = nb::none(),
      "prop"_a = nb::none(),
      "Dequantize -> add scale * b @ a -> re-quantize (see pyfuse.fuse_requant). "
      "metal_rules=True evaluates MLX's Metal quantizer rules on the CPU (tests). "
      "prop: policy 'calibrated', the propagation matrix P (pyfuse.kernel.calibrated).");

  m.def(
      "fidelity_sums",
      [](std::vector<mx::array> inputs, float scale, int group_size, int bits) {
        auto s = pyfuse::fidelity_sums(std::move(inputs), scale, group_size, bits);
        nb::dict d;
        d["dd"] = s.dd;
        d["cc"] = s.cc;
        d["cd"] = s.cd;
        d["ww"] = s.ww;
        d["weights_changed"] = s.weights_changed;
        d["codes_changed"] = s.codes_changed;
        d["groups_refit"] = s.groups_refit;
        d["max_abs"] = s.max_abs;
        return d;
      },
      "inputs"_a, "scale"_a, "group_size"_a, "bits"_a,
      "Sums behind the fidelity figures of one fused tensor (pyfuse.kernel.fidelity).");

  m.def(
      "cpu_kernels",
      []() {
        nb::dict d;
        d["available"] = pyfuse::available_cpu_kernels();
        d["active"] = pyfuse::active_cpu_kernels();
        return d;
      },
      "The CPU kernel builds this processor runs (narrowest first) and the one in use.");
  m.def(
      "set_cpu_kernels", &pyfuse::set_cpu_kernels, "name"_a,
      "Force a CPU kernel build ('baseline', 'avx2', 'avx512') or 'auto' (the widest); "
      "for tests and benchmarks.");

  m.def(
      "simulate_metal_fuse_requant",
      &pyfuse::simulate_metal_fuse_requant,
      "inputs"_a, "scale"_a, "group_size"_a, "bits"_a, "policy"_a, "seed"_a, "prop"_a = nb::none(),
      "Run the Metal kernel source, compiled as C++, over a simulated grid (tests only).");
}
