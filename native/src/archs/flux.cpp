// FLUX.1 [dev] and [schnell] transformers from their real files, as Black Forest Labs' reference
// implementation computes them (github.com/black-forest-labs/flux: src/flux/model.py,
// modules/layers.py, math.py, sampling.py). PyTorch Linear convention (weight [out, in]
// row-major = ggml ne {in, out}).
//
// Files: safetensors in BFL's naming (img_in.weight, double_blocks.{i}.img_attn.qkv.weight, …),
// also under the `model.diffusion_model.` prefix of ComfyUI/sd.cpp checkpoints (whose other
// tensors — VAE, text encoders — are ignored), and GGUF with general.architecture = "flux" (the
// same names, ggml order). The configuration is read from the tensors: hidden size from
// img_in.weight, depths by counting blocks, [dev] (guidance-distilled) by guidance_in.*; the rest
// is FLUX.1's: head_dim 128, RoPE axes [16, 56, 56] with θ = 10000, 64 latent channels in and out,
// context 4096, vec 768, MLP ratio 4, qkv bias.
//
// Segments: prelude (img_in, time_in, vector_in, guidance_in, txt_in), double_blocks.{i},
// single_blocks.{i}, final. Activations, ggml order (B samples, L image tokens, T text tokens,
// H hidden, N = T + L):
//   img      [64, L, B]       the packed latent (kLatent: the sampler's, the job's result)
//   txt      [4096, T, B]     T5 embeddings (input)
//   vec      [768, B]         CLIP pooled vector (input)
//   img_ids  [3, L, B]        image token positions (input; a row-major grid when absent)
//   guidance [B]              dev only, from the options
//   t        [B]              the timestep of the step (the sampler's)
//   pe       [128, 2, N, B]   RoPE tables, computed once per job on the host (job state)
//   cond     [H, B]           the modulation vector of the step (state)
//   x        [H, N, B]        txt tokens then img tokens (state): double blocks read and write
//                             the two streams as views of it, single blocks use it whole
//   v        [64, L, B]       the predicted velocity (output)
//
// Numerics on ggml's CPU backend. Matrix products convert activations to the weight type's dot
// type (lib/model/reference.ts). Attention is ggml_flash_attn_ext with f32 q, k and v: on the CPU
// it computes in float32 throughout (online softmax, no f16 anywhere) and never materialises the
// [N, N] scores (2 GB per sample at 1024×1024); CUDA converts k and v to f16 for it. GELU(tanh)
// is built from exact ops (ggml_gelu reads an f16 table on the CPU). RoPE rotates adjacent pairs
// with tables computed in float64 (BFL: float32) and rounded to float32.
#include <algorithm>
#include <cmath>
#include <cstdlib>
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

constexpr int64_t kHeadDim = 128;
constexpr int64_t kAxes[3] = {16, 56, 56};  // pairs 0–7, 8–35, 36–63 of a head
constexpr double kTheta = 10000;
constexpr int64_t kChannels = 64;  // 16 latent channels × a 2×2 patch, in and out
constexpr int64_t kContext = 4096;
constexpr int64_t kVecDim = 768;
constexpr int64_t kTimeDim = 256;
constexpr int kMaxPeriod = 10000;
constexpr float kTimeFactor = 1000.0f;
constexpr int64_t kMlpRatio = 4;
constexpr float kNormEps = 1e-6f;
const char* const kPrefix = "model.diffusion_model.";
const char* const kGgufArchitecture = "flux";

struct FluxConfig {
  int64_t hidden = 0;
  int64_t depth = 0;         // double blocks
  int64_t depth_single = 0;  // single blocks
  bool guidance = false;     // FLUX.1 [dev]: guidance_in
};

// BFL's get_schedule: t = linspace(1, 0, S+1), optionally shifted towards 1 by
// exp(mu)/(exp(mu) + 1/t − 1) with mu linear in the image tokens (0.5 at 256, 1.15 at 4096).
// In float64 (BFL: float32 tensors, then Python floats).
std::vector<double> flux_schedule(int64_t steps, int64_t image_tokens, bool shift) {
  std::vector<double> t(static_cast<size_t>(steps + 1));
  for (int64_t i = 0; i <= steps; i++) t[i] = 1.0 - static_cast<double>(i) / steps;
  if (shift) {
    const double m = (1.15 - 0.5) / (4096 - 256);
    const double mu = m * static_cast<double>(image_tokens) + (0.5 - m * 256);
    for (double& v : t) {
      if (v > 0) v = std::exp(mu) / (std::exp(mu) + (1 / v - 1));
    }
  }
  return t;
}

class Flux final : public ModelArch {
 public:
  Flux(const FluxConfig& c, std::string prefix) : c_(c), prefix_(std::move(prefix)) {
    if (c.hidden <= 0 || c.hidden % kHeadDim != 0 || c.depth <= 0 || c.depth_single < 0) {
      throw InvalidArgumentError("flux: bad configuration " + describe() +
                                 ": hidden must be a positive multiple of 128, depth ≥ 1 and "
                                 "depth_single ≥ 0");
    }
    heads_ = c.hidden / kHeadDim;
    const int64_t H = c.hidden, M = kMlpRatio * H;
    auto n = [&](const std::string& name) { return prefix_ + name; };
    auto embedder = [&](std::vector<WeightSpec>& w, const std::string& p, int64_t in) {
      w.push_back(mat(n(p + ".in_layer.weight"), H, in));
      w.push_back(vec(n(p + ".in_layer.bias"), H));
      w.push_back(mat(n(p + ".out_layer.weight"), H, H));
      w.push_back(vec(n(p + ".out_layer.bias"), H));
    };
    SegmentSpec prelude{"prelude", "prelude", {}};
    prelude.weights.push_back(mat(n("img_in.weight"), H, kChannels));
    prelude.weights.push_back(vec(n("img_in.bias"), H));
    embedder(prelude.weights, "time_in", kTimeDim);
    embedder(prelude.weights, "vector_in", kVecDim);
    if (c.guidance) embedder(prelude.weights, "guidance_in", kTimeDim);
    prelude.weights.push_back(mat(n("txt_in.weight"), H, kContext));
    prelude.weights.push_back(vec(n("txt_in.bias"), H));
    segments_.push_back(std::move(prelude));
    for (int64_t i = 0; i < c.depth; i++) {
      const std::string name = "double_blocks." + std::to_string(i);
      SegmentSpec s{name, "double", {}};
      for (const char* stream : {"img", "txt"}) {
        const std::string p = name + "." + stream;
        s.weights.push_back(mat(n(p + "_mod.lin.weight"), 6 * H, H));
        s.weights.push_back(vec(n(p + "_mod.lin.bias"), 6 * H));
        s.weights.push_back(mat(n(p + "_attn.qkv.weight"), 3 * H, H));
        s.weights.push_back(vec(n(p + "_attn.qkv.bias"), 3 * H));
        s.weights.push_back(vec(n(p + "_attn.norm.query_norm.scale"), kHeadDim));
        s.weights.push_back(vec(n(p + "_attn.norm.key_norm.scale"), kHeadDim));
        s.weights.push_back(mat(n(p + "_attn.proj.weight"), H, H));
        s.weights.push_back(vec(n(p + "_attn.proj.bias"), H));
        s.weights.push_back(mat(n(p + "_mlp.0.weight"), M, H));
        s.weights.push_back(vec(n(p + "_mlp.0.bias"), M));
        s.weights.push_back(mat(n(p + "_mlp.2.weight"), H, M));
        s.weights.push_back(vec(n(p + "_mlp.2.bias"), H));
      }
      segments_.push_back(std::move(s));
    }
    for (int64_t i = 0; i < c.depth_single; i++) {
      const std::string name = "single_blocks." + std::to_string(i);
      const std::string p = name + ".";
      segments_.push_back(
          {name,
           "single",
           {mat(n(p + "linear1.weight"), 3 * H + M, H), vec(n(p + "linear1.bias"), 3 * H + M),
            mat(n(p + "linear2.weight"), H, H + M), vec(n(p + "linear2.bias"), H),
            vec(n(p + "norm.query_norm.scale"), kHeadDim),
            vec(n(p + "norm.key_norm.scale"), kHeadDim),
            mat(n(p + "modulation.lin.weight"), 3 * H, H),
            vec(n(p + "modulation.lin.bias"), 3 * H)}});
    }
    segments_.push_back({"final",
                         "final",
                         {mat(n("final_layer.adaLN_modulation.1.weight"), 2 * H, H),
                          vec(n("final_layer.adaLN_modulation.1.bias"), 2 * H),
                          mat(n("final_layer.linear.weight"), kChannels, H),
                          vec(n("final_layer.linear.bias"), kChannels)}});
  }

  std::string name() const override { return "flux"; }

  std::string describe() const override {
    return std::string("flux FLUX.1-") + (c_.guidance ? "dev" : "schnell") + ", hidden " +
           std::to_string(c_.hidden) + " (" + std::to_string(c_.hidden / kHeadDim) + " heads), " +
           std::to_string(c_.depth) + " double + " + std::to_string(c_.depth_single) +
           " single blocks";
  }

  std::map<std::string, double> config() const override {
    return {{"hidden", double(c_.hidden)},
            {"heads", double(heads_)},
            {"depth", double(c_.depth)},
            {"depth_single", double(c_.depth_single)},
            {"guidance", c_.guidance ? 1.0 : 0.0}};
  }

  const std::vector<SegmentSpec>& segments() const override { return segments_; }

  bool owns_tensor(const std::string& name) const override {
    return prefix_.empty() || name.compare(0, prefix_.size(), prefix_) == 0;
  }

  void check_job(const JobShape& job) const override {
    if (job.batch < 1 || job.tokens < 1 || job.context_tokens < 1) {
      throw InvalidArgumentError(
          "run: FLUX needs batch, image tokens and text tokens ≥ 1 (got batch " +
          std::to_string(job.batch) + ", image tokens " + std::to_string(job.tokens) +
          ", text tokens " + std::to_string(job.context_tokens) + ")");
    }
    // Every activation and intermediate (the single blocks' [7H, N, B]) must be representable.
    const int64_t n = job.tokens + job.context_tokens;
    checked_product({job.batch, n, 8 * c_.hidden, 16}, "batch × tokens × hidden");
    checked_product({job.batch, job.context_tokens, kContext, 16}, "batch × text tokens");
  }

  std::vector<ActivationSpec> activations(const JobShape& job) const override {
    using Role = ActivationSpec::Role;
    auto act = [](const char* name, Role role, std::initializer_list<int64_t> ne) {
      ActivationSpec a;
      a.name = name;
      a.role = role;
      a.n_dims = static_cast<int>(ne.size());
      int d = 0;
      for (int64_t v : ne) a.ne[d++] = v;
      return a;
    };
    const int64_t B = job.batch, L = job.tokens, T = job.context_tokens, H = c_.hidden;
    std::vector<ActivationSpec> out = {
        act("img", Role::kLatent, {kChannels, L, B}),
        act("txt", Role::kInput, {kContext, T, B}),
        act("vec", Role::kInput, {kVecDim, B}),
        act("img_ids", Role::kInput, {3, L, B}),
    };
    if (c_.guidance) out.push_back(act("guidance", Role::kInput, {B}));
    out.push_back(act("t", Role::kStepInput, {B}));
    out.push_back(act("pe", Role::kJobState, {kHeadDim, 2, T + L, B}));
    out.push_back(act("cond", Role::kState, {H, B}));
    out.push_back(act("x", Role::kState, {H, T + L, B}));
    out.push_back(act("v", Role::kOutput, {kChannels, L, B}));
    return out;
  }

  bool generate_input(const ActivationSpec& spec, uint64_t seed,
                      std::vector<float>& out) const override {
    if (spec.name == "guidance") return false;  // from the options, in prepare_job
    if (spec.name != "img_ids") return ModelArch::generate_input(spec, seed, out);
    // Positions of an h×w grid of patches (h the largest divisor of L up to √L), row-major, as
    // BFL's prepare() makes them: (0, row, column).
    const int64_t L = spec.ne[1], B = spec.ne[2];
    int64_t h = 1;
    for (int64_t d = 1; d * d <= L; d++) {
      if (L % d == 0) h = d;
    }
    const int64_t w = L / h;
    out.assign(static_cast<size_t>(spec.elements()), 0.0f);
    for (int64_t b = 0; b < B; b++) {
      for (int64_t l = 0; l < L; l++) {
        float* id = &out[static_cast<size_t>((b * L + l) * 3)];
        id[1] = static_cast<float>(l / w);
        id[2] = static_cast<float>(l % w);
      }
    }
    return true;
  }

  // The guidance scale, and the RoPE tables from the ids (txt ids are zeros): per sample, token
  // and pair i of a head (axis a, its j-th pair), angle = id[a]·θ^(−2j/dim_a); row 0 holds
  // cos, cos and row 1 −sin, sin for the pair's two elements, so rope(x) = x·row0 + swap(x)·row1.
  void prepare_job(const JobShape& job, const SamplerOptions& options,
                   HostTensors& host) const override {
    const int64_t B = job.batch, L = job.tokens, T = job.context_tokens, N = T + L;
    if (c_.guidance) {
      host["guidance"].assign(static_cast<size_t>(B), static_cast<float>(options.guidance));
    }
    const std::vector<float>& ids = host.at("img_ids");
    std::vector<float>& pe = host["pe"];
    pe.assign(static_cast<size_t>(B * N * 2 * kHeadDim), 0.0f);
    for (int64_t b = 0; b < B; b++) {
      for (int64_t n = 0; n < N; n++) {
        float* row = &pe[static_cast<size_t>((b * N + n) * 2 * kHeadDim)];
        int64_t pair = 0;
        for (int a = 0; a < 3; a++) {
          const double pos =
              n < T ? 0.0 : static_cast<double>(ids[static_cast<size_t>((b * L + n - T) * 3 + a)]);
          for (int64_t j = 0; j < kAxes[a] / 2; j++, pair++) {
            const double angle = pos * std::pow(kTheta, -2.0 * j / kAxes[a]);
            const auto c = static_cast<float>(std::cos(angle));
            const auto s = static_cast<float>(std::sin(angle));
            row[2 * pair] = c;
            row[2 * pair + 1] = c;
            row[kHeadDim + 2 * pair] = -s;
            row[kHeadDim + 2 * pair + 1] = s;
          }
        }
      }
    }
  }

  void build_segment(ggml_context* ctx, ggml_cgraph* graph, size_t index,
                     const std::vector<ggml_tensor*>& w, const Activations& act,
                     const JobShape& job) const override {
    const std::string& kind = segments_.at(index).kind;
    ggml_tensor* x = act.get("x");
    ggml_tensor* cond = act.get("cond");
    if (kind == "prelude") {
      ggml_build_forward_expand(
          graph, ggml_cpy(ctx, linear(ctx, act.get("img"), w[0], w[1]), img_part(ctx, x, job)));
      size_t k = 2;
      auto embedder = [&](ggml_tensor* in) {
        ggml_tensor* h = ggml_silu(ctx, linear(ctx, in, w[k], w[k + 1]));
        ggml_tensor* out = linear(ctx, h, w[k + 2], w[k + 3]);
        k += 4;
        return out;
      };
      ggml_tensor* c = embedder(timestep_embedding(ctx, act.get("t")));
      ggml_tensor* y = embedder(act.get("vec"));
      if (c_.guidance) {
        // BFL adds guidance before the vector: vec = (time + guidance) + vector.
        ggml_tensor* g = embedder(timestep_embedding(ctx, act.get("guidance")));
        c = ggml_add(ctx, c, g);
      }
      c = ggml_add(ctx, c, y);
      ggml_build_forward_expand(graph, ggml_cpy(ctx, c, cond));
      ggml_build_forward_expand(
          graph, ggml_cpy(ctx, linear(ctx, act.get("txt"), w[k], w[k + 1]), txt_part(ctx, x, job)));
    } else if (kind == "double") {
      double_block(ctx, graph, w, act, job);
    } else if (kind == "single") {
      ggml_tensor* mod = linear(ctx, ggml_silu(ctx, cond), w[6], w[7]);  // [3H, B]
      ggml_tensor* h = linear(ctx, modulate(ctx, x, chunk(ctx, mod, 0), chunk(ctx, mod, 1)), w[0],
                              w[1]);  // [3H + 4H, N, B]: q | k | v | mlp
      const int64_t H = c_.hidden, n = job.tokens + job.context_tokens;
      ggml_tensor* q = qk_norm(ctx, head_view(ctx, h, 0, n, job), w[4]);
      ggml_tensor* k = qk_norm(ctx, head_view(ctx, h, 1, n, job), w[5]);
      ggml_tensor* v = head_view(ctx, h, 2, n, job);
      ggml_tensor* pe = act.get("pe");
      ggml_tensor* a = attention(ctx, rope(ctx, q, pe), rope(ctx, k, pe), v, n, job);
      ggml_tensor* mlp =
          ggml_cont(ctx, ggml_view_3d(ctx, h, kMlpRatio * H, n, job.batch, h->nb[1], h->nb[2],
                                      static_cast<size_t>(3 * H) * sizeof(float)));
      ggml_tensor* out = linear(ctx, ggml_concat(ctx, a, gelu_tanh(ctx, mlp), 0), w[2], w[3]);
      ggml_build_forward_expand(
          graph, ggml_cpy(ctx, ggml_add(ctx, x, ggml_mul(ctx, out, chunk(ctx, mod, 2))), x));
    } else {
      // LastLayer: shift, scale = adaLN_modulation(vec).chunk(2) — shift first.
      ggml_tensor* mod = linear(ctx, ggml_silu(ctx, cond), w[0], w[1]);  // [2H, B]
      ggml_tensor* h = modulate(ctx, img_part(ctx, x, job), chunk(ctx, mod, 0), chunk(ctx, mod, 1));
      ggml_build_forward_expand(graph, ggml_cpy(ctx, linear(ctx, h, w[2], w[3]), act.get("v")));
    }
  }

  std::unique_ptr<StepDriver> step_driver(const JobShape& job,
                                          const SamplerOptions& options) const override {
    return flow_match_euler_sampler(
        "img", "v", "t", flux_schedule(options.steps, job.tokens, options.shift), job.batch);
  }

 private:
  // The txt tokens [H, T, B] and img tokens [H, L, B] of x.
  ggml_tensor* txt_part(ggml_context* ctx, ggml_tensor* x, const JobShape& job) const {
    return ggml_view_3d(ctx, x, c_.hidden, job.context_tokens, job.batch, x->nb[1], x->nb[2], 0);
  }
  ggml_tensor* img_part(ggml_context* ctx, ggml_tensor* x, const JobShape& job) const {
    return ggml_view_3d(ctx, x, c_.hidden, job.tokens, job.batch, x->nb[1], x->nb[2],
                        static_cast<size_t>(job.context_tokens) * x->nb[1]);
  }

  // Chunk k of a modulation [m·H, B] as [H, 1, B], to broadcast over tokens (a copy: ggml's CPU
  // scale wants contiguous tensors).
  ggml_tensor* chunk(ggml_context* ctx, ggml_tensor* mod, int64_t k) const {
    return ggml_cont(ctx, ggml_view_3d(ctx, mod, c_.hidden, 1, mod->ne[1], mod->nb[1], mod->nb[1],
                                       static_cast<size_t>(k * c_.hidden) * sizeof(float)));
  }

  // (1 + scale)·LayerNorm(x) + shift; LayerNorm without affine, eps 1e-6.
  static ggml_tensor* modulate(ggml_context* ctx, ggml_tensor* x, ggml_tensor* shift,
                               ggml_tensor* scale) {
    ggml_tensor* normed = ggml_norm(ctx, x, kNormEps);
    return ggml_add(ctx, ggml_mul(ctx, normed, ggml_scale_bias(ctx, scale, 1.0f, 1.0f)), shift);
  }

  // Part k (q, k, v) of a qkv projection [≥3H, n, B] as heads [128, heads, n, B] (a view).
  ggml_tensor* head_view(ggml_context* ctx, ggml_tensor* qkv, int64_t k, int64_t n,
                         const JobShape& job) const {
    return ggml_view_4d(ctx, qkv, kHeadDim, heads_, n, job.batch, kHeadDim * sizeof(float),
                        qkv->nb[1], qkv->nb[2], static_cast<size_t>(k * c_.hidden) * sizeof(float));
  }

  // QKNorm: RMSNorm over each head (eps 1e-6) times its learned scale.
  static ggml_tensor* qk_norm(ggml_context* ctx, ggml_tensor* x, ggml_tensor* scale) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, kNormEps), as_f32(ctx, scale));
  }

  // RoPE on adjacent pairs: out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = x[2i+1]·cos + x[2i]·sin,
  // as x·pe[0] + swap(x)·pe[1] (prepare_job's tables) on x [128, heads, N, B], contiguous.
  ggml_tensor* rope(ggml_context* ctx, ggml_tensor* x, ggml_tensor* pe) const {
    const int64_t pairs = kHeadDim / 2, rows = x->ne[1] * x->ne[2], B = x->ne[3];
    auto half = [&](size_t offset) {
      return ggml_view_4d(ctx, x, 1, pairs, rows, B, 2 * sizeof(float), kHeadDim * sizeof(float),
                          x->nb[3], offset);
    };
    ggml_tensor* swapped = ggml_concat(ctx, half(sizeof(float)), half(0), 0);
    swapped = ggml_reshape_4d(ctx, swapped, kHeadDim, x->ne[1], x->ne[2], B);
    auto table = [&](int64_t r) {
      return ggml_view_4d(ctx, pe, kHeadDim, 1, pe->ne[2], pe->ne[3], pe->nb[1], pe->nb[2],
                          pe->nb[3], static_cast<size_t>(r) * pe->nb[1]);
    };
    return ggml_add(ctx, ggml_mul(ctx, x, table(0)), ggml_mul(ctx, swapped, table(1)));
  }

  // Softmax attention of every head over all n tokens; q, k, v [128, heads, n, B]; → [H, n, B].
  ggml_tensor* attention(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v,
                         int64_t n, const JobShape& job) const {
    ggml_tensor* o = ggml_flash_attn_ext(
        ctx, ggml_permute(ctx, q, 0, 2, 1, 3), ggml_permute(ctx, k, 0, 2, 1, 3),
        ggml_permute(ctx, v, 0, 2, 1, 3), nullptr, 1.0f / std::sqrt(float(kHeadDim)), 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
    return ggml_reshape_3d(ctx, o, c_.hidden, n, job.batch);  // o: [128, heads, n, B]
  }

  // timestep_embedding(1000·t, 256): [cos | sin] of 1000·t·exp(−ln(10000)·j/128), [256, B].
  static ggml_tensor* timestep_embedding(ggml_context* ctx, ggml_tensor* t) {
    return ggml_timestep_embedding(ctx, ggml_scale(ctx, t, kTimeFactor), kTimeDim, kMaxPeriod);
  }

  void double_block(ggml_context* ctx, ggml_cgraph* graph, const std::vector<ggml_tensor*>& w,
                    const Activations& act, const JobShape& job) const {
    const int64_t T = job.context_tokens, L = job.tokens, N = T + L, B = job.batch;
    ggml_tensor* x = act.get("x");
    ggml_tensor* silu = ggml_silu(ctx, act.get("cond"));
    struct Stream {
      ggml_tensor* in;
      ggml_tensor* mod;  // [6H, B]: shift, scale, gate (attention), shift, scale, gate (MLP)
      ggml_tensor *q, *k, *v;
      int64_t tokens;
      size_t w0;  // its first weight
    };
    Stream img{img_part(ctx, x, job), nullptr, nullptr, nullptr, nullptr, L, 0};
    Stream txt{txt_part(ctx, x, job), nullptr, nullptr, nullptr, nullptr, T, 12};
    for (Stream* s : {&img, &txt}) {
      const size_t o = s->w0;
      s->mod = linear(ctx, silu, w[o], w[o + 1]);
      ggml_tensor* qkv =
          linear(ctx, modulate(ctx, s->in, chunk(ctx, s->mod, 0), chunk(ctx, s->mod, 1)), w[o + 2],
                 w[o + 3]);
      s->q = qk_norm(ctx, head_view(ctx, qkv, 0, s->tokens, job), w[o + 4]);
      s->k = qk_norm(ctx, head_view(ctx, qkv, 1, s->tokens, job), w[o + 5]);
      s->v = head_view(ctx, qkv, 2, s->tokens, job);
    }
    // Joint attention over txt tokens then img tokens.
    ggml_tensor* pe = act.get("pe");
    ggml_tensor* q = rope(ctx, ggml_concat(ctx, txt.q, img.q, 2), pe);
    ggml_tensor* k = rope(ctx, ggml_concat(ctx, txt.k, img.k, 2), pe);
    ggml_tensor* v = ggml_concat(ctx, txt.v, img.v, 2);
    ggml_tensor* a = attention(ctx, q, k, v, N, job);  // [H, N, B]
    for (Stream* s : {&img, &txt}) {
      const size_t o = s->w0;
      const size_t at = s == &img ? static_cast<size_t>(T) * a->nb[1] : 0;
      ggml_tensor* part =
          ggml_cont(ctx, ggml_view_3d(ctx, a, c_.hidden, s->tokens, B, a->nb[1], a->nb[2], at));
      ggml_tensor* h = ggml_add(
          ctx, s->in, ggml_mul(ctx, linear(ctx, part, w[o + 6], w[o + 7]), chunk(ctx, s->mod, 2)));
      ggml_tensor* m = linear(ctx, modulate(ctx, h, chunk(ctx, s->mod, 3), chunk(ctx, s->mod, 4)),
                              w[o + 8], w[o + 9]);
      m = linear(ctx, gelu_tanh(ctx, m), w[o + 10], w[o + 11]);
      h = ggml_add(ctx, h, ggml_mul(ctx, m, chunk(ctx, s->mod, 5)));
      ggml_build_forward_expand(graph, ggml_cpy(ctx, h, s->in));
    }
  }

  FluxConfig c_;
  std::string prefix_;
  int64_t heads_ = 0;
  std::vector<SegmentSpec> segments_;
};

// The largest index + 1 of "<prefix><group>.<i>." names; ModelFormatError for an index that is
// not a plain decimal or that no file of this size could hold.
int64_t count_blocks(const ModelFile& f, const std::string& prefix, const std::string& group) {
  const std::string head = prefix + group + ".";
  int64_t count = 0;
  for (const auto& t : f.tensors()) {
    if (t.name.compare(0, head.size(), head) != 0) continue;
    const size_t dot = t.name.find('.', head.size());
    const std::string digits = t.name.substr(head.size(), dot - head.size());
    const bool plain = dot != std::string::npos && !digits.empty() && digits.size() <= 9 &&
                       digits.find_first_not_of("0123456789") == std::string::npos &&
                       (digits == "0" || digits[0] != '0');
    if (!plain) {
      throw ModelFormatError(f.path() + ": tensor \"" + t.name + "\" is not a FLUX.1 " + group +
                             " tensor (expected " + head + "<index>.…)");
    }
    const int64_t index = std::strtoll(digits.c_str(), nullptr, 10);
    if (static_cast<uint64_t>(index) >= f.tensors().size()) {
      throw ModelFormatError(f.path() + ": tensor \"" + t.name + "\": block index " + digits +
                             " but the file holds only " + std::to_string(f.tensors().size()) +
                             " tensors");
    }
    count = std::max(count, index + 1);
  }
  return count;
}

// "model.diffusion_model." when the file's FLUX tensors carry it, else "".
std::string flux_prefix(const ModelFile& f) {
  return f.find(std::string(kPrefix) + "img_in.weight") ? kPrefix : "";
}

}  // namespace

std::vector<double> flux_timesteps(int64_t steps, int64_t image_tokens, bool shift) {
  return flux_schedule(steps, image_tokens, shift);
}

bool is_flux(const ModelFile& file) {
  if (file.format() == ModelFormat::kGguf) {
    const GgufValue* arch = file.gguf()->find("general.architecture");
    if (arch) return arch->type == GgufValueType::kString && arch->str == kGgufArchitecture;
  }
  const std::string prefix = flux_prefix(file);
  return file.find(prefix + "img_in.weight") &&
         file.find(prefix + "double_blocks.0.img_attn.qkv.weight");
}

std::unique_ptr<ModelArch> flux_for_file(const ModelFile& file) {
  const std::string prefix = flux_prefix(file);
  const std::string where = file.path() + " (FLUX.1)";
  const TensorInfo* img_in = file.find(prefix + "img_in.weight");
  if (!img_in) {
    throw ModelFormatError(where + ": missing tensor \"img_in.weight\" (FLUX.1's first layer; " +
                           "also looked under \"" + kPrefix + "\")");
  }
  const auto& shape = img_in->shape;  // row-major [H, 64]
  if (shape.size() != 2 || shape[1] != kChannels || shape[0] <= 0 || shape[0] % kHeadDim != 0) {
    std::string text = "[";
    for (size_t i = 0; i < shape.size(); i++) text += (i ? ", " : "") + std::to_string(shape[i]);
    throw ModelFormatError(
        where + ": tensor \"" + img_in->name + "\" has shape " + text +
        "], expected [hidden, 64] with hidden a multiple of 128 (FLUX.1 [dev]/[schnell] take 64 "
        "latent channels in 128-wide heads; Fill, Depth and Canny variants are not supported)");
  }
  FluxConfig c;
  c.hidden = shape[0];
  c.depth = count_blocks(file, prefix, "double_blocks");
  c.depth_single = count_blocks(file, prefix, "single_blocks");
  c.guidance = file.find(prefix + "guidance_in.in_layer.weight") != nullptr;
  if (c.depth == 0) {
    throw ModelFormatError(where + ": missing tensor \"" + prefix +
                           "double_blocks.0.img_attn.qkv.weight\" (no double blocks)");
  }
  return std::make_unique<Flux>(c, prefix);
}

std::unique_ptr<ModelArch> flux_from_config(const std::map<std::string, double>& config) {
  auto get = [&](const char* key, bool required, double fallback, double min) -> int64_t {
    const auto it = config.find(key);
    if (it == config.end()) {
      if (!required) return static_cast<int64_t>(fallback);
      throw InvalidArgumentError(std::string("flux: the configuration lacks \"") + key + "\"");
    }
    const double v = it->second;
    if (!(v >= min && v <= 1e9) || v != std::floor(v)) {
      throw InvalidArgumentError(std::string("flux: \"") + key + "\" must be an integer ≥ " +
                                 std::to_string(static_cast<int>(min)) + ", got " +
                                 std::to_string(v));
    }
    return static_cast<int64_t>(v);
  };
  FluxConfig c;
  c.hidden = get("hidden", true, 0, 1);
  c.depth = get("depth", true, 0, 1);
  c.depth_single = get("depth_single", true, 0, 0);
  const int64_t guidance = get("guidance", false, 0, 0);
  if (guidance > 1) throw InvalidArgumentError("flux: \"guidance\" must be 0 or 1");
  c.guidance = guidance == 1;
  return std::make_unique<Flux>(c, "");
}

}  // namespace ferry
