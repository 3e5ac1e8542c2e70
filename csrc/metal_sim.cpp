// Runs the Metal kernel source over a simulated grid on the CPU
// (csrc/metal_grid.h) on MLX arrays. Tests and `pyfuse self-check` compare
// its output bit for bit with the CPU primitive evaluating MLX's Metal rules
// (Rounding::Metal). Never used for real work.
#include "csrc/metal_sim.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>

#include "mlx/ops.h"
#include "mlx/types/half_types.h"
#include "mlx/transforms.h"

// Last: it brings in the Metal shim (see there).
#include "csrc/metal_grid.h"
#include "metal/fuse_calibrated.h"

namespace pyfuse {

namespace {

struct HostOut {
  uint32_t* w;
  void* scales;
  void* biases;
};

// The calibrated kernel: one thread per row, a grid rounded up to whole
// threadgroups of 32 (the extra threads must return).
template <typename T, int gs, int bits>
void run_calibrated_rows(const std::vector<mx::array>& in, HostOut out, const FuseParams& p, uint32_t n_rows,
                         const float* prop) {
  const float* magnitude = in.size() > 5 ? in[5].data<float>() : nullptr;
  std::vector<float> row_k(n_rows, 1.0f);
  if (magnitude) {
    for (uint32_t r = 0; r < n_rows; ++r) {
      fuse_requant_row_factor<T, gs, bits>(
          in[0].data<uint32_t>(), in[1].data<T>(), in[2].data<T>(), in[3].data<float>(),
          in[4].data<float>(), magnitude, row_k.data(), p, n_rows, r);
    }
  }
  std::vector<float> scratch(size_t(n_rows) * p.in_dims);
  int has_prop = prop != nullptr ? 1 : 0;
  for (uint32_t r = 0; r < ((n_rows + 31) / 32) * 32; ++r) {
    fuse_calibrated<T, gs, bits>(
        has_prop ? prop : row_k.data(), scratch.data(), p, has_prop, n_rows, in[0].data<uint32_t>(),
        in[1].data<T>(), in[2].data<T>(), in[3].data<float>(), in[4].data<float>(), row_k.data(), out.w,
        static_cast<T*>(out.scales), static_cast<T*>(out.biases), r);
  }
}

template <typename T, int gs, int bits>
void run_grid(const std::vector<mx::array>& in, HostOut out, const FuseParams& p, uint32_t n_rows,
              const float* prop) {
  if (p.policy == kCalibrated) return run_calibrated_rows<T, gs, bits>(in, out, p, n_rows, prop);
  const CpuBuffers buf{
      in[0].data<uint32_t>(), in[1].data<T>(), in[2].data<T>(), in[3].data<float>(),
      in[4].data<float>(), in.size() > 5 ? in[5].data<float>() : nullptr, out.w, out.scales, out.biases};
  run_metal_grid<T, gs, bits>(buf, p, n_rows);
}

template <typename T>
void run_typed(const std::vector<mx::array>& in, HostOut out, const FuseParams& p,
               uint32_t n_rows, int gs, int bits, const float* prop) {
#define PYFUSE_CASE(B, G) \
  if (bits == B && gs == G) return run_grid<T, G, B>(in, out, p, n_rows, prop);
  PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
#undef PYFUSE_CASE
  throw std::invalid_argument("[pyfuse._ext.simulate_metal_fuse_requant] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
}

} // namespace

std::vector<mx::array> simulate_metal_fuse_requant(
    std::vector<mx::array> inputs, float scale, int group_size, int bits, int policy, uint32_t seed,
    std::optional<mx::array> prop) {
  for (auto& x : inputs) mx::eval(x);
  if (prop) {
    *prop = mx::contiguous(mx::astype(*prop, mx::float32));
    mx::eval(*prop);
  }
  const float* prop_data = prop ? prop->data<float>() : nullptr;
  const auto& w = inputs[0];
  const auto& scales = inputs[1];
  // Outputs are computed into host buffers, then copied into new arrays.
  size_t n_words = w.size(), n_groups = scales.size(), item = scales.itemsize();
  std::vector<uint32_t> w_out(n_words);
  std::vector<uint8_t> s_out(n_groups * item), b_out(n_groups * item);
  // no_nan stays 0: the real Metal kernel converts with the hardware's rounding.
  FuseParams p = fuse_params(inputs[3].shape(-1), w.shape(-2), inputs[3].shape(-2), scales.shape(-1),
                             policy, scale, stochastic_key(seed), inputs.size() > 5);
  uint32_t n_rows = w.size() / w.shape(-1);
  HostOut out{w_out.data(), s_out.data(), b_out.data()};
  auto dt = scales.dtype();
  if (dt == mx::float32) {
    run_typed<float>(inputs, out, p, n_rows, group_size, bits, prop_data);
    return {mx::array(w_out.data(), w.shape(), mx::uint32),
            mx::array(reinterpret_cast<float*>(s_out.data()), scales.shape(), dt),
            mx::array(reinterpret_cast<float*>(b_out.data()), scales.shape(), dt)};
  }
  if (dt == mx::float16) {
    run_typed<mx::float16_t>(inputs, out, p, n_rows, group_size, bits, prop_data);
    return {mx::array(w_out.data(), w.shape(), mx::uint32),
            mx::array(reinterpret_cast<mx::float16_t*>(s_out.data()), scales.shape(), dt),
            mx::array(reinterpret_cast<mx::float16_t*>(b_out.data()), scales.shape(), dt)};
  }
  run_typed<mx::bfloat16_t>(inputs, out, p, n_rows, group_size, bits, prop_data);
  return {mx::array(w_out.data(), w.shape(), mx::uint32),
          mx::array(reinterpret_cast<mx::bfloat16_t*>(s_out.data()), scales.shape(), dt),
          mx::array(reinterpret_cast<mx::bfloat16_t*>(b_out.data()), scales.shape(), dt)};
}

} // namespace pyfuse
