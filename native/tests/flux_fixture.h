#pragma once
// Tiny FLUX.1 models for the native tests: every tensor of the layout (from the architecture's
// own specs) with random values, written as safetensors or GGUF.
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "test_support.h"

namespace ferry_test {

struct FluxSpec {
  int64_t hidden = 128;
  int64_t depth = 2;
  int64_t depth_single = 1;
  bool guidance = true;
  std::string prefix;
  uint64_t seed = 3;
};

inline std::unique_ptr<ferry::ModelArch> flux_arch(const FluxSpec& s) {
  return ferry::arch_from_config("flux", {{"hidden", double(s.hidden)},
                                          {"depth", double(s.depth)},
                                          {"depth_single", double(s.depth_single)},
                                          {"guidance", s.guidance ? 1.0 : 0.0}});
}

struct FluxTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major
  bool matrix;
  std::vector<float> values;
};

// Every tensor of the FLUX.1 layout (from the architecture's own specs, so the test writes what
// the binding expects), with random values: matrices U(−1, 1)/√in, biases 0.1·U, norm scales
// 1 + 0.1·U. `fill` may overwrite values by name.
inline std::vector<FluxTensor> flux_tensors(
    const FluxSpec& s, const std::function<void(FluxTensor&)>& fill = nullptr) {
  std::mt19937_64 rng(s.seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<FluxTensor> out;
  const auto arch = flux_arch(s);
  for (const auto& seg : arch->segments()) {
    for (const auto& w : seg.weights) {
      FluxTensor t{s.prefix + w.name, {}, w.matrix, {}};
      for (int d = w.n_dims - 1; d >= 0; d--) t.shape.push_back(w.ne[d]);
      const int64_t n = w.ne[0] * w.ne[1];
      t.values.resize(static_cast<size_t>(n));
      const bool scale = w.name.size() > 6 && w.name.substr(w.name.size() - 6) == ".scale";
      for (auto& v : t.values) {
        v = w.matrix ? u(rng) / std::sqrt(static_cast<float>(w.ne[0]))
                     : (scale ? 1.0f + 0.1f * u(rng) : 0.1f * u(rng));
      }
      if (fill) fill(t);
      out.push_back(std::move(t));
    }
  }
  return out;
}

inline void write_flux_safetensors(const std::string& path, const std::vector<FluxTensor>& tensors,
                                   const std::string& dtype = "F32",
                                   const std::vector<WriteTensor>& extra = {}) {
  std::vector<WriteTensor> w = extra;
  for (const auto& t : tensors) w.push_back({t.name, dtype, t.shape, encode(t.values, dtype)});
  write_safetensors(path, {}, w);
}

inline void write_flux_gguf(const std::string& path, const std::vector<FluxTensor>& tensors,
                            ggml_type type, const char* arch = "flux") {
  GgufBuilder g;
  if (arch) g.kv_string("general.architecture", arch);
  for (const auto& t : tensors) {
    const std::vector<uint64_t> ne(t.shape.rbegin(), t.shape.rend());
    const ggml_type stored = dit_gguf_tensor_type(type, t.shape);
    g.tensor(t.name, ne, static_cast<uint32_t>(stored),
             ggml_encode(stored, t.values, static_cast<int64_t>(ne[0])));
  }
  write_file(path, g.bytes());
}

}  // namespace ferry_test
