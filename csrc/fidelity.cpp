// The sums behind pyfuse's fidelity figures (pyfuse/kernel/fidelity.py) for one
// quantized tensor before and after a fuse, in one multithreaded pass over
// the packed codes: the pure-MLX path needs several float32 copies of the
// tensor and ~25 ns per weight on the CPU. Grid values are q * scale + bias
// in float32 (as mx.dequantize with float32 scales); sums are in double.
#include "csrc/fidelity.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>

#include "csrc/fuse_math.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace pyfuse {

namespace {

template <typename T, int bits, int group_size>
void sums_rows(const std::vector<mx::array>& in, const FuseParams& p, bool has_delta, size_t row0,
               size_t row1, FidelitySums& out) {
  constexpr int words_per_group = group_size * bits / 32;
  const uint32_t* w0 = in[0].data<uint32_t>();
  const T* s0 = in[1].data<T>();
  const T* b0 = in[2].data<T>();
  const uint32_t* w1 = in[3].data<uint32_t>();
  const T* s1 = in[4].data<T>();
  const T* b1 = in[5].data<T>();
  const float* a = has_delta ? in[6].data<float>() : nullptr;
  const float* b = has_delta ? in[7].data<float>() : nullptr;
  FidelitySums acc;
  pf_code q0[group_size];
  pf_code q1[group_size];
  float delta[group_size];
  for (size_t row = row0; row < row1; ++row) {
    for (int g = 0; g < p.groups_per_row; ++g) {
      const size_t sg = row * p.groups_per_row + g;
      unpack_group<bits, group_size>(w0 + sg * words_per_group, q0);
      unpack_group<bits, group_size>(w1 + sg * words_per_group, q1);
      const float fs0 = static_cast<float>(s0[sg]), fb0 = static_cast<float>(b0[sg]);
      const float fs1 = static_cast<float>(s1[sg]), fb1 = static_cast<float>(b1[sg]);
      acc.groups_refit += (fs0 != fs1 || fb0 != fb1) ? 1 : 0;
      if (has_delta) {
        group_delta_at<group_size>(p, uint32_t(row), uint32_t(g), a, b, delta);
      }
      for (int j = 0; j < group_size; ++j) {
        float before = float(q0[j]) * fs0;
        before = before + fb0;
        float after = float(q1[j]) * fs1;
        after = after + fb1;
        const double change = double(after) - double(before);
        acc.cc += change * change;
        acc.ww += double(before) * double(before);
        acc.weights_changed += before != after;
        acc.codes_changed += q0[j] != q1[j];
        acc.max_abs = std::max(acc.max_abs, std::fabs(change));
        if (has_delta) {
          acc.dd += double(delta[j]) * double(delta[j]);
          acc.cd += change * double(delta[j]);
        }
      }
    }
  }
  out = acc;
}

using SumsFn = void (*)(const std::vector<mx::array>&, const FuseParams&, bool, size_t, size_t,
                        FidelitySums&);

template <typename T>
SumsFn select_typed(int bits, int group_size) {
#define PYFUSE_CASE(B, G) \
  if (bits == B && group_size == G) return &sums_rows<T, B, G>;
  PYFUSE_FOR_EACH_BITS_GROUP_SIZE(PYFUSE_CASE)
#undef PYFUSE_CASE
  throw std::invalid_argument("[pyfuse._ext.fidelity_sums] " PYFUSE_UNSUPPORTED_BITS_GROUP_SIZE);
}

} // namespace

FidelitySums fidelity_sums(std::vector<mx::array> inputs, float scale, int group_size, int bits) {
  if (inputs.size() != 6 && inputs.size() != 8) {
    throw std::invalid_argument("[pyfuse._ext.fidelity_sums] expects w0, s0, b0, w1, s1, b1[, a, b]");
  }
  const bool has_delta = inputs.size() == 8;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (i >= 6) inputs[i] = mx::astype(inputs[i], mx::float32);
    inputs[i] = mx::contiguous(inputs[i]);
  }
  mx::eval(inputs);
  const auto& w = inputs[0];
  const auto& s = inputs[1];
  if (inputs[3].shape() != w.shape() || inputs[4].shape() != s.shape() || inputs[2].shape() != s.shape() ||
      inputs[5].shape() != s.shape() || inputs[4].dtype() != s.dtype() || w.ndim() < 2) {
    throw std::invalid_argument("[pyfuse._ext.fidelity_sums] the two (w, scales, biases) triples must match");
  }
  FuseParams p{};
  p.in_dims = w.shape(-1) * 32 / bits;
  p.out_dims = w.shape(-2);
  p.groups_per_row = s.shape(-1);
  p.scale = scale;
  p.rank = has_delta ? inputs[6].shape(-2) : 0;
  if (p.groups_per_row * group_size != p.in_dims) {
    throw std::invalid_argument("[pyfuse._ext.fidelity_sums] w and scales disagree with group_size/bits");
  }
  SumsFn fn = s.dtype() == mx::float32   ? select_typed<float>(bits, group_size)
      : s.dtype() == mx::float16          ? select_typed<mx::float16_t>(bits, group_size)
                                          : select_typed<mx::bfloat16_t>(bits, group_size);
  const size_t n_rows = w.size() / w.shape(-1);
  size_t n_threads = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), n_rows / 8));
  std::vector<FidelitySums> parts(n_threads);
  std::vector<std::thread> pool;
  size_t per = (n_rows + n_threads - 1) / n_threads;
  for (size_t t = 0; t < n_threads; ++t) {
    size_t r0 = t * per, r1 = std::min(n_rows, r0 + per);
    if (r0 >= r1) continue;
    pool.emplace_back(fn, std::cref(inputs), std::cref(p), has_delta, r0, r1, std::ref(parts[t]));
  }
  for (auto& th : pool) th.join();
  FidelitySums total;
  for (const auto& part : parts) {
    total.dd += part.dd;
    total.cc += part.cc;
    total.cd += part.cd;
    total.ww += part.ww;
    total.weights_changed += part.weights_changed;
    total.codes_changed += part.codes_changed;
    total.groups_refit += part.groups_refit;
    total.max_abs = std::max(total.max_abs, part.max_abs);
  }
  return total;
}

} // namespace pyfuse
