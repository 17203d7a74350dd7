// Ferry's synthetic DiT (README "The model"): an embedding, N pre-norm transformer blocks
// (RMSNorm, multi-head attention, 4× GELU MLP) and a final projection back to the latent's C
// channels. PyTorch Linear convention (weight [out, in] row-major = ggml ne {in, out}).
//
// Segments: prelude (embed), blocks.0 … blocks.N−1, final. Activations, ggml order:
//   z [C, T, B]  the latent (the sampler's; job input, from the seed when absent)
//   x [D, T, B]  the hidden state the segments hand on
//   y [C, T, B]  the model's output
// Math on ggml's CPU backend: a matrix product converts its activations to the weight type's
// dot-product type first (f16 for f16 weights, q8_0 for q8_0/q4_0, q8_K for k-quants) —
// lib/model/reference.ts reproduces that. GELU is built from exact ops (see gelu_tanh).
#include <cmath>
#include <string>

#include "arch_ops.h"
#include "archs.h"
#include "ferry/errors.h"
#include "ferry/gguf.h"
#include "ferry/sampler.h"

namespace ferry {

namespace {

using arch_ops::as_f32;
using arch_ops::checked_product;
using arch_ops::gelu_tanh;
using arch_ops::linear;
using arch_ops::mat;
using arch_ops::vec;

constexpr float kRmsNormEps = 1e-6f;
const char* const kSafetensorsArchKey = "ferry.arch";
const char* const kGgufArchitecture = "ferry-dit";

struct DitConfig {
  int64_t hidden = 0;    // D
  int64_t heads = 0;     // H
  int64_t channels = 0;  // C
  int64_t blocks = 0;    // N
};

ggml_tensor* rms_norm(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w) {
  return ggml_mul(ctx, ggml_rms_norm(ctx, x, kRmsNormEps), as_f32(ctx, w));
}

class FerryDit final : public ModelArch {
 public:
  explicit FerryDit(const DitConfig& c) : c_(c) {
    if (c.hidden <= 0 || c.heads <= 0 || c.channels <= 0 || c.blocks <= 0 ||
        c.hidden % c.heads != 0) {
      throw InvalidArgumentError("ferry-dit: bad configuration " + describe() +
                                 ": all must be positive and heads must divide hidden");
    }
    const int64_t D = c.hidden, C = c.channels;
    segments_.push_back({"prelude", "prelude", {mat("embed.weight", D, C), vec("embed.bias", D)}});
    for (int64_t i = 0; i < c.blocks; i++) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      segments_.push_back({"blocks." + std::to_string(i),
                           "block",
                           {vec(p + "norm1.weight", D), mat(p + "attn.qkv.weight", 3 * D, D),
                            vec(p + "attn.qkv.bias", 3 * D), mat(p + "attn.out.weight", D, D),
                            vec(p + "attn.out.bias", D), vec(p + "norm2.weight", D),
                            mat(p + "mlp.fc1.weight", 4 * D, D), vec(p + "mlp.fc1.bias", 4 * D),
                            mat(p + "mlp.fc2.weight", D, 4 * D), vec(p + "mlp.fc2.bias", D)}});
    }
    segments_.push_back(
        {"final",
         "final",
         {vec("final.norm.weight", D), mat("final.out.weight", C, D), vec("final.out.bias", C)}});
  }

  std::string name() const override { return "ferry-dit"; }

  std::string describe() const override {
    return "ferry-dit " + std::to_string(c_.blocks) + " blocks, hidden " +
           std::to_string(c_.hidden) + ", heads " + std::to_string(c_.heads) + ", channels " +
           std::to_string(c_.channels);
  }

  std::map<std::string, double> config() const override {
    return {{"hidden", double(c_.hidden)},
            {"heads", double(c_.heads)},
            {"channels", double(c_.channels)},
            {"blocks", double(c_.blocks)}};
  }

  const std::vector<SegmentSpec>& segments() const override { return segments_; }

  void check_job(const JobShape& job) const override {
    if (job.batch < 1 || job.tokens < 1) {
      throw InvalidArgumentError("run: batch and tokens must be ≥ 1 (got batch " +
                                 std::to_string(job.batch) + ", tokens " +
                                 std::to_string(job.tokens) + ")");
    }
    // Every activation, and one sample's attention scores, must be representable.
    checked_product({job.batch, job.tokens, c_.hidden, 16}, "batch × tokens × hidden");
    checked_product({job.batch, c_.heads, job.tokens, job.tokens, 4}, "the attention scores");
  }

  std::vector<ActivationSpec> activations(const JobShape& job) const override {
    using Role = ActivationSpec::Role;
    auto act = [&](const char* name, Role role, int64_t width) {
      ActivationSpec a;
      a.name = name;
      a.role = role;
      a.n_dims = 3;
      a.ne[0] = width;
      a.ne[1] = job.tokens;
      a.ne[2] = job.batch;
      return a;
    };
    return {act("z", Role::kLatent, c_.channels), act("x", Role::kState, c_.hidden),
            act("y", Role::kOutput, c_.channels)};
  }

  void build_segment(ggml_context* ctx, ggml_cgraph* graph, size_t index,
                     const std::vector<ggml_tensor*>& w, const Activations& act,
                     const JobShape& job) const override {
    ggml_tensor* x = act.get("x");
    const std::string& kind = segments_.at(index).kind;
    if (kind == "prelude") {
      ggml_build_forward_expand(graph, ggml_cpy(ctx, linear(ctx, act.get("z"), w[0], w[1]), x));
    } else if (kind == "block") {
      ggml_build_forward_expand(graph, ggml_cpy(ctx, block(ctx, x, w, job), x));
    } else {
      ggml_tensor* h = rms_norm(ctx, x, w[0]);
      ggml_build_forward_expand(graph, ggml_cpy(ctx, linear(ctx, h, w[1], w[2]), act.get("y")));
    }
  }

  std::unique_ptr<StepDriver> step_driver(const JobShape&,
                                          const SamplerOptions& options) const override {
    return euler_drift_sampler("z", "y", options.steps);
  }

 private:
  // x + attn(rmsnorm(x)·norm1), then + mlp(rmsnorm(·)·norm2).
  ggml_tensor* block(ggml_context* ctx, ggml_tensor* x, const std::vector<ggml_tensor*>& w,
                     const JobShape& job) const {
    const int64_t D = c_.hidden, H = c_.heads, dh = D / H, T = job.tokens, B = job.batch;
    ggml_tensor* h = rms_norm(ctx, x, w[0]);
    ggml_tensor* qkv = linear(ctx, h, w[1], w[2]);  // [3D, T, B]: q | k | v
    auto part = [&](int64_t k) {
      ggml_tensor* v = ggml_view_3d(ctx, qkv, D, T, B, qkv->nb[1], qkv->nb[2],
                                    static_cast<size_t>(k * D) * ggml_element_size(qkv));
      return ggml_reshape_4d(ctx, ggml_cont(ctx, v), dh, H, T, B);  // heads: blocks of dh
    };
    ggml_tensor* q = ggml_permute(ctx, part(0), 0, 2, 1, 3);                  // [dh, T, H, B]
    ggml_tensor* k = ggml_permute(ctx, part(1), 0, 2, 1, 3);                  // [dh, T, H, B]
    ggml_tensor* v = ggml_cont(ctx, ggml_permute(ctx, part(2), 1, 2, 0, 3));  // [T, dh, H, B]
    ggml_tensor* scores = ggml_mul_mat(ctx, k, q);                            // [Tk, Tq, H, B]
    ggml_tensor* p = ggml_soft_max_ext(ctx, scores, nullptr, 1.0f / std::sqrt(float(dh)), 0.0f);
    ggml_tensor* o = ggml_mul_mat(ctx, v, p);  // [dh, Tq, H, B]
    o = ggml_reshape_3d(ctx, ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3)), D, T, B);
    ggml_tensor* x1 = ggml_add(ctx, x, linear(ctx, o, w[3], w[4]));
    ggml_tensor* h2 = rms_norm(ctx, x1, w[5]);
    ggml_tensor* m = gelu_tanh(ctx, linear(ctx, h2, w[6], w[7]));
    return ggml_add(ctx, x1, linear(ctx, m, w[8], w[9]));
  }

  DitConfig c_;
  std::vector<SegmentSpec> segments_;
};

// A positive decimal integer, written plainly ("64", not "0x40", "6.4e1" or " 64"), as the
// generator writes it and lib/model/dit.ts reads it.
int64_t metadata_int(const ModelFile& file, const char* key) {
  const auto it = file.metadata().find(key);
  if (it == file.metadata().end()) {
    throw ModelFormatError(file.path() + ": __metadata__ lacks \"" + key + "\"");
  }
  const std::string& text = it->second;
  bool ok = !text.empty() && text.size() <= 15 && text[0] >= '1' && text[0] <= '9';
  int64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') ok = false;
    if (ok) value = value * 10 + (c - '0');
  }
  if (!ok) {
    throw ModelFormatError(file.path() + ": __metadata__ \"" + key + "\" = \"" + text +
                           "\" is not a positive decimal integer");
  }
  return value;
}

DitConfig safetensors_config(const ModelFile& f) {
  const std::string& arch = f.metadata().at(kSafetensorsArchKey);
  if (arch != "dit") {
    throw ModelFormatError(f.path() + ": unsupported architecture \"" + kSafetensorsArchKey +
                           "\" = \"" + arch + "\" (expected \"dit\")");
  }
  DitConfig c;
  c.blocks = metadata_int(f, "ferry.blocks");
  c.hidden = metadata_int(f, "ferry.hidden");
  c.heads = metadata_int(f, "ferry.heads");
  c.channels = metadata_int(f, "ferry.channels");
  if (c.hidden % c.heads != 0) {
    throw ModelFormatError(f.path() +
                           ": __metadata__ \"ferry.heads\" = " + std::to_string(c.heads) +
                           " does not divide \"ferry.hidden\" = " + std::to_string(c.hidden));
  }
  return c;
}

DitConfig gguf_config(const ModelFile& f) {
  const GgufHeader& g = *f.gguf();
  const std::string& path = f.path();
  auto read = [&](const char* name) -> int64_t {
    const std::string key = std::string(kGgufArchitecture) + "." + name;
    const GgufValue* v = g.find(key);
    if (!v) throw ModelFormatError(path + ": metadata lacks \"" + key + "\"");
    // gen-model writes uint32; any integer type holding a positive value is accepted, as the
    // TypeScript reader accepts it.
    uint64_t n = 0;
    if (!v->as_uint64(&n) || n == 0 || n > static_cast<uint64_t>(kMaxTensorDim)) {
      throw ModelFormatError(path + ": metadata \"" + key + "\" must be a positive integer, got " +
                             gguf_value_type_name(v->type) + " " + gguf_value_summary(*v));
    }
    return static_cast<int64_t>(n);
  };
  DitConfig c;
  c.blocks = read("blocks");
  c.hidden = read("hidden");
  c.heads = read("heads");
  c.channels = read("channels");
  if (c.hidden % c.heads != 0) {
    throw ModelFormatError(path + ": \"ferry-dit.heads\" = " + std::to_string(c.heads) +
                           " does not divide \"ferry-dit.hidden\" = " + std::to_string(c.hidden));
  }
  return c;
}

}  // namespace

bool is_ferry_dit(const ModelFile& file) {
  if (file.format() == ModelFormat::kGguf) {
    const GgufValue* arch = file.gguf()->find("general.architecture");
    return arch && arch->type == GgufValueType::kString && arch->str == kGgufArchitecture;
  }
  return file.metadata().count(kSafetensorsArchKey) != 0;
}

std::unique_ptr<ModelArch> ferry_dit_for_file(const ModelFile& file) {
  const DitConfig c =
      file.format() == ModelFormat::kGguf ? gguf_config(file) : safetensors_config(file);
  // Binding stops at the first missing tensor, but a block count far beyond what the file holds
  // would still build that many specs first: no file has more blocks than tensors.
  if (static_cast<uint64_t>(c.blocks) > file.tensors().size()) {
    throw ModelFormatError(file.path() + ": declares " + std::to_string(c.blocks) +
                           " blocks but holds only " + std::to_string(file.tensors().size()) +
                           " tensors");
  }
  return std::make_unique<FerryDit>(c);
}

std::unique_ptr<ModelArch> ferry_dit_from_config(const std::map<std::string, double>& config) {
  auto get = [&](const char* key) -> int64_t {
    const auto it = config.find(key);
    if (it == config.end()) {
      throw InvalidArgumentError(std::string("ferry-dit: the configuration lacks \"") + key + "\"");
    }
    const double v = it->second;
    if (!(v >= 1 && v <= 1e9) || v != std::floor(v)) {
      throw InvalidArgumentError(std::string("ferry-dit: \"") + key +
                                 "\" must be a positive integer, got " + std::to_string(v));
    }
    return static_cast<int64_t>(v);
  };
  DitConfig c;
  c.hidden = get("hidden");
  c.heads = get("heads");
  c.channels = get("channels");
  c.blocks = get("blocks");
  return std::make_unique<FerryDit>(c);
}

}  // namespace ferry
