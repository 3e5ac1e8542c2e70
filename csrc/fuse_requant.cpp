// The FuseRequant primitive: argument checks, the multithreaded CPU
// evaluation and the Metal dispatch. The per-group math is in csrc/fuse_math.h
// (csrc/math/); the supported values in pyfuse/options.py (csrc/options.h,
// generated at configure time).
#include "csrc/fuse_requant.h"

#include <dlfcn.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "csrc/math/calibrated.h"
#include "csrc/cpu_isa.h"
#include "csrc/fuse_cpu.h"
#include "csrc/fuse_math.h"
#include "csrc/options.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"

#ifdef _METAL_
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#endif

namespace pyfuse {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[pyfuse.fuse_requant] " + msg);
}

std::string shape_str(const mx::array& x) {
  std::ostringstream os;
  os << x.shape();
  return os.str();
}

int policy_from_string(const std::string& policy) {
#define PYFUSE_POLICY_ID(id, name) \
  if (policy == name) return id;
  PYFUSE_FOR_EACH_POLICY(PYFUSE_POLICY_ID)
#undef PYFUSE_POLICY_ID
  fail("policy '" + policy + "' is not supported; supported: " PYFUSE_SUPPORTED_POLICIES);
}

// pyfuse/options.py's POLICIES and the kernels' Policy enum list the same
// policies in the same order.
#define PYFUSE_COUNT_POLICY(id, name) +1
static_assert(0 PYFUSE_FOR_EACH_POLICY(PYFUSE_COUNT_POLICY) == kNumPolicies,
              "pyfuse/options.py POLICIES and Policy (csrc/math/params.h) differ");
#undef PYFUSE_COUNT_POLICY

void check_arguments(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& a,
    const mx::array& b,
    int group_size,
    int bits,
    const std::optional<mx::array>& magnitude) {
#define PYFUSE_IS(v) || value == v
  auto supported_bits = [](int value) { return false PYFUSE_FOR_EACH_BITS(PYFUSE_IS); };
  auto supported_group_size = [](int value) { return false PYFUSE_FOR_EACH_GROUP_SIZE(PYFUSE_IS); };
#undef PYFUSE_IS
  if (!supported_bits(bits)) {
    fail("bits=" + std::to_string(bits) + " is not supported; supported: " PYFUSE_SUPPORTED_BITS);
  }
  if (!supported_group_size(group_size)) {
    fail("group_size=" + std::to_string(group_size) + " is not supported; supported: " PYFUSE_SUPPORTED_GROUP_SIZES);
  }
  if (w.dtype() != mx::uint32) {
    fail("w must be uint32 (packed codes)");
  }
  auto dt = scales.dtype();
  if (dt != mx::bfloat16 && dt != mx::float16 && dt != mx::float32) {
    fail("scales dtype is not supported; supported: " PYFUSE_SUPPORTED_DTYPES);
  }
  if (biases.dtype() != dt) {
    fail("biases must have the dtype of scales");
  }
  if (w.ndim() != 2 && w.ndim() != 3) {
    fail("w must be 2-D or 3-D, got shape " + shape_str(w));
  }
  if (scales.shape() != biases.shape() || scales.ndim() != w.ndim()) {
    fail("scales " + shape_str(scales) + " and biases " + shape_str(biases) +
         " must match w " + shape_str(w));
  }
  for (int d = 0; d < int(w.ndim()) - 1; ++d) {
    if (scales.shape(d) != w.shape(d)) fail("scales " + shape_str(scales) + " do not match w " + shape_str(w));
  }
  int64_t in_dims = int64_t(w.shape(-1)) * 32 / bits;
  if ((int64_t(w.shape(-1)) * 32) % bits != 0 || int64_t(scales.shape(-1)) * group_size != in_dims) {
    fail("w " + shape_str(w) + " and scales " + shape_str(scales) +
         " disagree for group_size=" + std::to_string(group_size) + ", bits=" + std::to_string(bits));
  }
  if (a.ndim() != w.ndim() || b.ndim() != w.ndim()) {
    fail("a [..., r, in] and b [..., out, r] must have w's number of dims");
  }
  for (int d = 0; d < int(w.ndim()) - 2; ++d) {
    if (a.shape(d) != w.shape(d) || b.shape(d) != w.shape(d)) fail("a, b and w leading dims differ");
  }
  if (a.shape(-1) != in_dims) fail("a " + shape_str(a) + " must be [..., r, " + std::to_string(in_dims) + "]");
  if (b.shape(-2) != w.shape(-2)) fail("b " + shape_str(b) + " must be [..., out, r]");
  if (a.shape(-2) != b.shape(-1) || a.shape(-2) < 1) {
    fail("rank mismatch: a " + shape_str(a) + ", b " + shape_str(b));
  }
  if (int64_t(w.size()) * 32 / bits >= (int64_t(1) << 32)) {
    fail("tensors of 2^32 or more weights are not supported");
  }
  if (magnitude) {
    auto expect = w.shape();
    expect.pop_back();
    if (magnitude->shape() != expect) fail("magnitude " + shape_str(*magnitude) + " must be [..., out]");
  }
}

void check_prop(const mx::array& w, const mx::array& a, int policy, const std::optional<mx::array>& prop) {
  if (!prop) return;
  if (policy != kCalibrated) fail("prop is used by policy 'calibrated' only");
  auto expect = w.shape();
  expect.back() = a.shape(-1);
  expect[expect.size() - 2] = a.shape(-1);
  if (prop->shape() != expect) {
    std::ostringstream os;
    os << "prop " << prop->shape() << " must be [..., in, in] = " << mx::Shape(expect);
    fail(os.str());
  }
}

// ------------------------------------------------------------------ CPU

// Splits rows over the cores; each row is independent (DoRA rows compute
// their own norm first), so threads never share an output word.
void run_threads(RowsFn fn, const FuseParams& p, const CpuBuffers& buf, size_t n_rows) {
  std::vector<float> row_k(p.has_k ? n_rows : 0);
  size_t n_threads = std::max<size_t>(1, std::thread::hardware_concurrency());
  n_threads = std::min(n_threads, std::max<size_t>(1, n_rows / 8));
  size_t per = (n_rows + n_threads - 1) / n_threads;
  std::vector<std::thread> pool;
  for (size_t t = 1; t < n_threads; ++t) {
    size_t r0 = t * per, r1 = std::min(n_rows, r0 + per);
    if (r0 < r1) pool.emplace_back(fn, std::cref(p), std::cref(buf), row_k.data(), r0, r1);
  }
  fn(p, buf, row_k.data(), 0, std::min(n_rows, per));
  for (auto& th : pool) th.join();
}

// Large outputs are fresh memory that the kernels touch page by page; on
// Linux, transparent huge pages (in "madvise" mode by default) make that
// one fault per 2 MiB instead of one per 4 KiB (a 128 x 2048 x 512 3-bit
// tensor: 12,000 faults per fuse -> 500, ~8 % less time). Advice only:
// any error is ignored.
void prefer_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)nbytes;
#endif
}

FuseParams make_params(const mx::array& w, const mx::array& scales, const mx::array& a,
                       float scale, int policy, uint32_t seed, bool has_k) {
  // no_nan stays 0 here: eval_cpu, which can read a and b, sets it.
  return fuse_params(a.shape(-1), w.shape(-2), a.shape(-2), scales.shape(-1), policy, scale,
                     stochastic_key(seed), has_k);
}

} // namespace

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
    mx::StreamOrDevice s,
    const std::optional<mx::array>& prop) {
  int policy_id = policy_from_string(policy);
  check_arguments(w, scales, biases, a, b, group_size, bits, magnitude);
  check_prop(w, a, policy_id, prop);
  auto stream = mx::to_stream(s);
  // The kernels index raw row-major buffers of float32 LoRA factors.
  std::vector<mx::array> inputs = {
      mx::contiguous(w, false, stream),
      mx::contiguous(scales, false, stream),
      mx::contiguous(biases, false, stream),
      mx::contiguous(mx::astype(a, mx::float32, stream), false, stream),
      mx::contiguous(mx::astype(b, mx::float32, stream), false, stream)};
  if (magnitude) {
    inputs.push_back(mx::contiguous(mx::astype(*magnitude, mx::float32, stream), false, stream));
  }
  if (prop) {  // always the last input
    inputs.push_back(mx::contiguous(mx::astype(*prop, mx::float32, stream), false, stream));
  }
  return mx::array::make_arrays(
      {w.shape(), scales.shape(), scales.shape()},
      {mx::uint32, scales.dtype(), scales.dtype()},
      std::make_shared<FuseRequant>(
          stream, scale, group_size, bits, policy_id, seed, magnitude.has_value(), rounding,
          prop.has_value()),
      inputs);
}

void FuseRequant::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    prefer_huge_pages(out.data<void>(), out.nbytes());
  }
  const auto& w = inputs[0];
  const auto& scales = inputs[1];
  FuseParams p = make_params(w, scales, inputs[3], scale_, policy_, seed_, has_magnitude_);
  CpuBuffers buf{
      w.data<uint32_t>(),
      scales.data<void>(),
      inputs[2].data<void>(),
      inputs[3].data<float>(),
      inputs[4].data<float>(),
      has_magnitude_ ? inputs[5].data<float>() : nullptr,
      outputs[0].data<uint32_t>(),
      outputs[1].data<void>(),
      outputs[2].data<void>(),
      has_prop_ ? inputs.back().data<float>() : nullptr};
  RowsFn fn = policy_ == kCalibrated
      ? select_calibrated_rows_fn(scales.dtype(), bits_, group_size_)
      : select_rows_fn(scales.dtype(), bits_, group_size_, rounding_ == Rounding::Metal);
  size_t n_rows = w.size() / w.shape(-1);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs) encoder.set_input_array(x);
  for (auto& x : outputs) encoder.set_output_array(x);
  size_t n_a = inputs[3].size(), n_b = inputs[4].size();
  encoder.dispatch([fn, p, buf, n_rows, n_a, n_b]() mutable {
    p.no_nan = inputs_have_no_nan(p.scale, buf.a, n_a, buf.b, n_b);
    run_threads(fn, p, buf, n_rows);
  });
}

#ifdef _METAL_

namespace {

// The directory of this extension binary: pyfuse.metallib sits beside it.
std::string binary_dir() {
  static std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("[pyfuse.fuse_requant] cannot locate the extension binary");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

std::string kernel_suffix(mx::Dtype dtype, int group_size, int bits) {
  std::string type = dtype == mx::float32 ? "float32" : dtype == mx::float16 ? "float16" : "bfloat16";
  return type + "_gs_" + std::to_string(group_size) + "_b_" + std::to_string(bits);
}

// The calibrated policy: one thread per row (metal/fuse_calibrated.h), each
// with a scratch row of targets; after the DoRA row factors if any.
void dispatch_calibrated(mx::metal::Device& d, MTL::Library* lib, mx::metal::CommandEncoder& enc,
                         const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                         const mx::array& row_k, const FuseParams& p, bool has_prop,
                         const std::string& suffix) {
  uint32_t n_rows = inputs[0].size() / inputs[0].shape(-1);
  mx::array scratch({int(n_rows), p.in_dims}, mx::float32, nullptr, {});
  scratch.set_data(mx::allocator::malloc(scratch.nbytes()));
  enc.add_temporary(scratch);
  auto kernel = d.get_kernel("fuse_calibrated_" + suffix, lib);
  enc.set_compute_pipeline_state(kernel);
  enc.set_input_array(has_prop ? inputs.back() : row_k, 0);  // P, or an unread buffer
  enc.set_output_array(scratch, 1);
  enc.set_bytes(p, 2);
  int prop_flag = has_prop ? 1 : 0;
  enc.set_bytes(prop_flag, 3);
  enc.set_bytes(n_rows, 4);
  for (int i = 0; i < 5; ++i) enc.set_input_array(inputs[i], 5 + i);
  enc.set_input_array(row_k, 10);
  enc.set_output_array(outputs[0], 11);
  enc.set_output_array(outputs[1], 12);
  enc.set_output_array(outputs[2], 13);
  size_t tg = std::min<size_t>(n_rows, kernel->maxTotalThreadsPerThreadgroup());
  enc.dispatch_threads(MTL::Size(n_rows, 1, 1), MTL::Size(tg, 1, 1));
}

} // namespace

// NOTE: written against MLX 0.32's Metal extension API; it is compiled only
// when MLX was built with Metal and has not been run by pyfuse's CI (Linux).
void FuseRequant::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  const auto& w = inputs[0];
  const auto& scales = inputs[1];
  FuseParams p = make_params(w, scales, inputs[3], scale_, policy_, seed_, has_magnitude_);
  uint32_t n_rows = w.size() / w.shape(-1);
  auto suffix = kernel_suffix(scales.dtype(), group_size_, bits_);
  auto lib = d.get_library("pyfuse", binary_dir());
  auto& enc = mx::metal::get_command_encoder(s);

  // DoRA: the per-row factors first (one thread per row), then the groups.
  mx::array row_k({has_magnitude_ ? int(n_rows) : 1}, mx::float32, nullptr, {});
  row_k.set_data(mx::allocator::malloc(row_k.nbytes()));
  enc.add_temporary(row_k);
  if (has_magnitude_) {
    auto kernel = d.get_kernel("fuse_requant_row_factor_" + suffix, lib);
    enc.set_compute_pipeline_state(kernel);
    for (int i = 0; i < 5; ++i) enc.set_input_array(inputs[i], i);
    enc.set_input_array(inputs[5], 5);
    enc.set_output_array(row_k, 6);
    enc.set_bytes(p, 9);
    enc.set_bytes(n_rows, 10);
    size_t tg = std::min<size_t>(n_rows, kernel->maxTotalThreadsPerThreadgroup());
    enc.dispatch_threads(MTL::Size(n_rows, 1, 1), MTL::Size(tg, 1, 1));
  }

  if (policy_ == kCalibrated) {
    dispatch_calibrated(d, lib, enc, inputs, outputs, row_k, p, has_prop_, suffix);
    return;
  }
  auto kernel = d.get_kernel("fuse_requant_" + suffix, lib);
  enc.set_compute_pipeline_state(kernel);
  for (int i = 0; i < 5; ++i) enc.set_input_array(inputs[i], i);
  enc.set_input_array(row_k, 5);
  enc.set_output_array(outputs[0], 6);
  enc.set_output_array(outputs[1], 7);
  enc.set_output_array(outputs[2], 8);
  enc.set_bytes(p, 9);
  size_t gx = std::min<size_t>(p.groups_per_row, 32);
  size_t gy = std::max<size_t>(1, std::min<size_t>(n_rows, kernel->maxTotalThreadsPerThreadgroup() / gx));
  enc.dispatch_threads(MTL::Size(p.groups_per_row, n_rows, 1), MTL::Size(gx, gy, 1));
}

#else

void FuseRequant::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[pyfuse.fuse_requant] this build of pyfuse has no Metal kernels (MLX was built without Metal)");
}

#endif

bool FuseRequant::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const FuseRequant&>(other);
  return scale_ == o.scale_ && group_size_ == o.group_size_ && bits_ == o.bits_ &&
      policy_ == o.policy_ && seed_ == o.seed_ && has_magnitude_ == o.has_magnitude_ &&
      rounding_ == o.rounding_ && has_prop_ == o.has_prop_;
}

} // namespace pyfuse
