// The standalone harness of pyfuse's kernel math (see CMakeLists.txt here).
//
//   math_harness --builds             the CPU kernel builds this machine runs
//   math_harness IN OUT [BUILD]       every case of IN through three paths,
//                                     their outputs to OUT (BUILD: a CPU
//                                     kernel build; default: the widest)
//
// IN (little-endian, written by tests/native/harness_io.py): "PFHARN1\0",
// u32 case count, then per case 9 x i32 (bits, group_size, dtype 0/1/2 =
// float32/float16/bfloat16, policy, experts (0: 2-D), out, in, rank,
// has_magnitude), u32 seed, f32 scale, then w (u32), scales, biases (the
// dtype's bytes), a, b and magnitude (f32). OUT: per case and path, w,
// scales and biases as raw bytes; paths in order: the CPU kernel under the
// CPU's rounding, the CPU kernel under MLX's Metal rules, the Metal source.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "csrc/cpu_isa.h"
#include "metal_path.h"

namespace harness {

namespace {

// One case: its shapes and options, its inputs (and, while it runs, its
// outputs) as the kernels index them.
struct Case {
  int32_t bits, group_size, dtype, policy;
  int32_t experts;  // 0: a 2-D Linear
  int32_t out_dims, in_dims, rank, has_magnitude;
  uint32_t seed;
  float scale;
  pyfuse::CpuBuffers buf;

  size_t lead() const { return size_t(experts > 0 ? experts : 1); }
  size_t rows() const { return lead() * size_t(out_dims); }
  size_t n_words() const { return rows() * size_t(in_dims) * size_t(bits) / 32; }
  size_t n_groups() const { return rows() * size_t(in_dims / group_size); }
  size_t item() const { return dtype == kFloat32 ? 4 : 2; }
  size_t n_a() const { return lead() * size_t(rank) * size_t(in_dims); }
  size_t n_b() const { return rows() * size_t(rank); }
};

class Reader {
 public:
  explicit Reader(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path);
    data_.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  template <typename T>
  T value() {
    T v;
    std::memcpy(&v, take(sizeof(T)), sizeof(T));
    return v;
  }
  // Stays valid while the reader lives; copied so that it is aligned.
  template <typename T>
  const T* array(size_t n) {
    blocks_.emplace_back(n * sizeof(T) / 4 + 1);
    std::memcpy(blocks_.back().data(), take(n * sizeof(T)), n * sizeof(T));
    return reinterpret_cast<const T*>(blocks_.back().data());
  }
  const char* take(size_t n) {
    if (at_ + n > data_.size()) throw std::runtime_error("truncated input");
    at_ += n;
    return data_.data() + at_ - n;
  }

 private:
  std::vector<char> data_;
  std::vector<std::vector<uint32_t>> blocks_;
  size_t at_ = 0;
};

Case read_case(Reader& in) {
  Case c{};
  c.bits = in.value<int32_t>();
  c.group_size = in.value<int32_t>();
  c.dtype = in.value<int32_t>();
  c.policy = in.value<int32_t>();
  c.experts = in.value<int32_t>();
  c.out_dims = in.value<int32_t>();
  c.in_dims = in.value<int32_t>();
  c.rank = in.value<int32_t>();
  c.has_magnitude = in.value<int32_t>();
  c.seed = in.value<uint32_t>();
  c.scale = in.value<float>();
  c.buf.w_in = in.array<uint32_t>(c.n_words());
  c.buf.scales_in = in.array<char>(c.n_groups() * c.item());
  c.buf.biases_in = in.array<char>(c.n_groups() * c.item());
  c.buf.a = in.array<float>(c.n_a());
  c.buf.b = in.array<float>(c.n_b());
  c.buf.magnitude = c.has_magnitude ? in.array<float>(c.rows()) : nullptr;
  return c;
}

mlx::core::Dtype mlx_dtype(int32_t code) {
  return code == kFloat32 ? mlx::core::float32 : code == kFloat16 ? mlx::core::float16 : mlx::core::bfloat16;
}

pyfuse::FuseParams params(const Case& c) {
  return pyfuse::fuse_params(c.in_dims, c.out_dims, c.rank, c.in_dims / c.group_size, c.policy, c.scale,
                             pyfuse::stochastic_key(c.seed), c.has_magnitude != 0);
}

// The CPU kernel of the active build, single-threaded over every row (the
// extension splits rows over threads; rows are independent).
void run_cpu(const Case& c, bool metal_rules) {
  pyfuse::FuseParams p = params(c);
  p.no_nan = pyfuse::inputs_have_no_nan(c.scale, c.buf.a, c.n_a(), c.buf.b, c.n_b());
  std::vector<float> row_k(c.has_magnitude ? c.rows() : 0);
  pyfuse::select_rows_fn(mlx_dtype(c.dtype), c.bits, c.group_size, metal_rules)(
      p, c.buf, row_k.data(), 0, c.rows());
}

int run(const std::string& in_path, const std::string& out_path) {
  Reader in(in_path);
  if (std::string(in.take(8), 7) != "PFHARN1") throw std::runtime_error("not a harness input file");
  const uint32_t n_cases = in.value<uint32_t>();
  std::ofstream out(out_path, std::ios::binary);
  for (uint32_t i = 0; i < n_cases; ++i) {
    Case c = read_case(in);
    std::vector<uint32_t> w(c.n_words());
    std::vector<char> scales(c.n_groups() * c.item()), biases(c.n_groups() * c.item());
    c.buf.w_out = w.data();
    c.buf.scales_out = scales.data();
    c.buf.biases_out = biases.data();
    for (int path = 0; path < 3; ++path) {
      if (path < 2) {
        run_cpu(c, path == 1);
      } else {
        // no_nan stays 0, as in the extension's simulation of the GPU.
        run_metal_source(c.buf, params(c), uint32_t(c.rows()), c.dtype, c.bits, c.group_size);
      }
      out.write(reinterpret_cast<const char*>(w.data()), std::streamsize(w.size() * sizeof(uint32_t)));
      out.write(scales.data(), std::streamsize(scales.size()));
      out.write(biases.data(), std::streamsize(biases.size()));
    }
  }
  return out ? 0 : 1;
}

} // namespace

} // namespace harness

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "--builds") {
      for (const auto& name : pyfuse::available_cpu_kernels()) std::cout << name << "\n";
      return 0;
    }
    if (argc != 3 && argc != 4) {
      std::cerr << "usage: math_harness --builds | math_harness IN OUT [CPU_BUILD]\n";
      return 2;
    }
    pyfuse::set_cpu_kernels(argc == 4 ? argv[3] : "auto");
    return harness::run(argv[1], argv[2]);
  } catch (const std::exception& err) {
    std::cerr << "math_harness: " << err.what() << "\n";
    return 2;
  }
}
