// pyfuse.fuse_requant as an MLX Primitive: dequantize -> add a LoRA delta ->
// re-quantize, every expert of a SwitchLinear in ONE dispatch.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace pyfuse {

// Which affine quantizer the stock policy reproduces. `Native` is the one
// of the device the op runs on; `Metal` on the CPU evaluates MLX's Metal
// rules there (used by tests to check the Metal kernel's simulation).
enum class Rounding : int { Native = 0, Metal = 1 };

// Returns {w, scales, biases}. Inputs: w uint32 [..., out, in*bits/32];
// scales, biases [..., out, in/group_size] (bfloat16, float16, float32);
// a float32 [..., r, in]; b float32 [..., out, r]; magnitude (DoRA)
// float32 [..., out]; leading dims none or [E]. prop: policy "calibrated"
// only, float32 [..., in, in], the propagation matrix P of
// csrc/math/calibrated.h (none: plain nearest rounding on the kept grid).
std::vector<mx::array> fuse_requant(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& a,
    const mx::array& b,
    float scale,
    int group_size,
    int bits,
    const std::string& policy,
    uint32_t seed,
    const std::optional<mx::array>& magnitude,
    Rounding rounding,
    mx::StreamOrDevice s = {},
    const std::optional<mx::array>& prop = std::nullopt);

class FuseRequant : public mx::Primitive {
 public:
  FuseRequant(
      mx::Stream stream,
      float scale,
      int group_size,
      int bits,
      int policy,
      uint32_t seed,
      bool has_magnitude,
      Rounding rounding,
      bool has_prop = false)
      : mx::Primitive(stream),
        scale_(scale),
        group_size_(group_size),
        bits_(bits),
        policy_(policy),
        seed_(seed),
        has_magnitude_(has_magnitude),
        rounding_(rounding),
        has_prop_(has_prop) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "FuseRequant";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int group_size_;
  int bits_;
  int policy_;
  uint32_t seed_;
  bool has_magnitude_;
  Rounding rounding_;
  bool has_prop_;
};

} // namespace pyfuse
