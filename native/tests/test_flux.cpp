// FLUX.1 from its files: detection (safetensors with and without model.diffusion_model., GGUF
// general.architecture = "flux"), the configuration read from the tensors, a clear error naming
// the tensor for layouts that are not FLUX.1's, the job state (ids, RoPE tables, schedule), a
// forward checked by hand, measured segments at 1024×1024, and bitwise-identical output under
// every plan. The whole forward is compared with lib/model/fluxReference.ts by vitest.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "../src/archs/archs.h"
#include "ferry/arch.h"
#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/measure.h"
#include "ferry/model.h"
#include "ferry/runner.h"
#include "flux_fixture.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr const char* kPrefix = "model.diffusion_model.";
constexpr size_t kCapacity = size_t{64} << 20;

RunRequest flux_request(const Model& model, std::vector<PlanSegment> segments,
                        Execution execution = Execution::kSerial, uint32_t slots = 0) {
  (void)model;
  RunRequest r;
  r.job.batch = 2;
  r.job.tokens = 6;
  r.job.context_tokens = 3;
  r.steps = 2;
  r.seed = 11;
  r.sampler.guidance = 4.0;
  r.segments = std::move(segments);
  r.execution = execution;
  r.slots = slots;
  return r;
}

RunOutput run(CpuDevice& device, Model& model, const RunRequest& r) {
  DeviceLease lease(device);
  return run_job(lease, model, r, nullptr, [](StepReport&&) {});
}

void binds_every_layout() {
  TempDir dir;
  const auto check = [](const Model& m, const FluxSpec& s) {
    CHECK_EQ(m.arch().name(), std::string("flux"));
    const auto config = m.arch().config();
    CHECK_EQ(config.at("hidden"), double(s.hidden));
    CHECK_EQ(config.at("heads"), double(s.hidden / 128));
    CHECK_EQ(config.at("depth"), double(s.depth));
    CHECK_EQ(config.at("depth_single"), double(s.depth_single));
    CHECK_EQ(config.at("guidance"), s.guidance ? 1.0 : 0.0);
    const auto& seg = m.base_segments();
    CHECK_EQ(seg.size(), size_t(2 + s.depth + s.depth_single));
    CHECK_EQ(seg.front().name, std::string("prelude"));
    CHECK_EQ(seg.front().tensors.size(), size_t(s.guidance ? 16 : 12));
    CHECK_EQ(seg[1].name, std::string("double_blocks.0"));
    CHECK_EQ(seg[1].kind, std::string("double"));
    CHECK_EQ(seg[1].tensors.size(), size_t(24));
    CHECK_EQ(seg[1 + s.depth].name, std::string("single_blocks.0"));
    CHECK_EQ(seg[1 + s.depth].tensors.size(), size_t(8));
    CHECK_EQ(seg.back().name, std::string("final"));
    CHECK_EQ(seg.back().tensors.front().name, s.prefix + "final_layer.adaLN_modulation.1.weight");
  };

  FluxSpec dev;
  const std::string plain = dir.file("dev.safetensors");
  write_flux_safetensors(plain, flux_tensors(dev), "BF16");
  check(*Model::open(plain), dev);

  // ComfyUI/sd.cpp checkpoints: the prefix, beside a VAE and text encoders that are ignored.
  FluxSpec prefixed = dev;
  prefixed.prefix = kPrefix;
  prefixed.guidance = false;
  const std::string comfy = dir.file("comfy.safetensors");
  write_flux_safetensors(
      comfy, flux_tensors(prefixed), "F16",
      {{"first_stage_model.decoder.conv_in.weight", "F32", {4, 2}, std::string(32, '\0')},
       {"text_encoders.clip_l.logit_scale", "F32", {1}, std::string(4, '\0')}});
  check(*Model::open(comfy), prefixed);

  FluxSpec quant = dev;
  quant.depth_single = 2;
  const std::string gguf = dir.file("flux.gguf");
  write_flux_gguf(gguf, flux_tensors(quant), GGML_TYPE_Q8_0);
  auto m = Model::open(gguf);
  check(*m, quant);
  CHECK_EQ(std::string(ggml_type_name(m->base_segments()[1].tensors[0].type)), std::string("q8_0"));
  CHECK_EQ(std::string(ggml_type_name(m->base_segments()[1].tensors[1].type)), std::string("f32"));

  // A GGUF without general.architecture is recognised by its names (GGUF names are at most 63
  // bytes: the prefixed ones do not fit, and no shared FLUX GGUF has them).
  FluxSpec schnell = dev;
  schnell.guidance = false;
  const std::string bare = dir.file("bare.gguf");
  write_flux_gguf(bare, flux_tensors(schnell), GGML_TYPE_Q4_0, nullptr);
  check(*Model::open(bare), schnell);
}

void errors_name_the_tensor() {
  TempDir dir;
  FluxSpec s;
  const std::string path = dir.file("bad.safetensors");
  auto expect = [&](std::vector<FluxTensor> tensors, const std::string& needle,
                    const std::vector<WriteTensor>& extra = {}) {
    write_flux_safetensors(path, tensors, "F32", extra);
    CHECK_THROWS(ModelFormatError, Model::open(path), needle);
  };
  // Fill/Depth variants take 384/128 channels; 16 is an unpacked latent.
  auto tensors = flux_tensors(s);
  for (auto& t : tensors) {
    if (t.name == "img_in.weight") t.shape = {128, 32}, t.values.resize(128 * 32);
  }
  expect(tensors, "tensor \"img_in.weight\" has shape [128, 32], expected [hidden, 64]");

  // A hidden size that is not a whole number of 128-wide heads.
  tensors = flux_tensors(s);
  for (auto& t : tensors) {
    if (t.name == "img_in.weight") t.shape = {96, 64}, t.values.resize(96 * 64);
  }
  expect(tensors, "\"img_in.weight\" has shape [96, 64]");

  tensors = flux_tensors(s);
  tensors.erase(std::remove_if(
                    tensors.begin(), tensors.end(),
                    [](const FluxTensor& t) { return t.name == "double_blocks.1.txt_mlp.2.bias"; }),
                tensors.end());
  expect(tensors, "missing tensor \"double_blocks.1.txt_mlp.2.bias\"");

  // An MLP ratio other than 4.
  tensors = flux_tensors(s);
  for (auto& t : tensors) {
    if (t.name == "single_blocks.0.linear1.weight") {
      t.shape = {128 * 6, 128};
      t.values.resize(128 * 6 * 128);
    }
  }
  expect(tensors,
         "tensor \"single_blocks.0.linear1.weight\" has shape [768, 128], expected [896, 128]");

  expect(flux_tensors(s), "unexpected tensor \"double_blocks.0.img_attn.extra\"",
         {{"double_blocks.0.img_attn.extra", "F32", {1}, std::string(4, '\0')}});
  expect(flux_tensors(s), "tensor \"double_blocks.x.img_mod.lin.weight\" is not a FLUX.1",
         {{"double_blocks.x.img_mod.lin.weight", "F32", {1}, std::string(4, '\0')}});

  // Prefixed: tensors outside the prefix are ignored, unknown ones inside it are not.
  FluxSpec prefixed = s;
  prefixed.prefix = kPrefix;
  expect(flux_tensors(prefixed), "unexpected tensor \"model.diffusion_model.lora_down\"",
         {{"model.diffusion_model.lora_down", "F32", {1}, std::string(4, '\0')}});

  // Norm scales must be float; fp8 checkpoints are refused by name.
  tensors = flux_tensors(s);
  std::vector<WriteTensor> w;
  for (const auto& t : tensors) {
    const bool fp8 = t.name == "double_blocks.0.img_attn.qkv.weight";
    w.push_back({t.name, fp8 ? "F8_E4M3" : "F32", t.shape,
                 fp8 ? std::string(t.values.size(), '\0') : encode(t.values, "F32")});
  }
  write_safetensors(path, {}, w);
  CHECK_THROWS(ModelFormatError, Model::open(path),
               "tensor \"double_blocks.0.img_attn.qkv.weight\" has dtype F8_E4M3");

  // A GGUF that declares FLUX but holds something else.
  const std::string gguf = dir.file("empty.gguf");
  GgufBuilder g;
  g.kv_string("general.architecture", "flux");
  g.tensor("weight", {4}, GGML_TYPE_F32, std::string(16, '\0'));
  write_file(gguf, g.bytes());
  CHECK_THROWS(ModelFormatError, Model::open(gguf), "missing tensor \"img_in.weight\"");

  CHECK_THROWS(InvalidArgumentError,
               arch_from_config("flux", {{"hidden", 100}, {"depth", 1}, {"depth_single", 0}}),
               "multiple of 128");
  CHECK_THROWS(InvalidArgumentError, arch_from_config("flux", {{"hidden", 128}, {"depth", 1}}),
               "lacks \"depth_single\"");
}

void job_state_and_schedule() {
  auto arch = flux_arch(FluxSpec{});
  JobShape job{2, 6, 2};
  // Ids: a 2×3 grid, row-major, for every sample.
  ActivationSpec ids_spec;
  for (const auto& a : arch->activations(job)) {
    if (a.name == "img_ids") ids_spec = a;
  }
  std::vector<float> ids;
  CHECK(arch->generate_input(ids_spec, 0, ids));
  const std::vector<float> grid = {0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 1, 0, 0, 1, 1, 0, 1, 2};
  CHECK(std::equal(grid.begin(), grid.end(), ids.begin()));
  CHECK(std::equal(grid.begin(), grid.end(), ids.begin() + 18));

  HostTensors host;
  ids[18 + 3 * 4 + 1] = 2.5f;  // sample 1, image token 4: (0, 2.5, 1)
  host["img_ids"] = ids;
  SamplerOptions options;
  options.guidance = 4.5;
  arch->prepare_job(job, options, host);
  CHECK(host.at("guidance") == std::vector<float>({4.5f, 4.5f}));
  const auto& pe = host.at("pe");
  CHECK_EQ(pe.size(), size_t(2 * 8 * 2 * 128));
  auto at = [&](int64_t b, int64_t n, int64_t row, int64_t k) {
    return pe[static_cast<size_t>(((b * 8 + n) * 2 + row) * 128 + k)];
  };
  // Text tokens: position 0, no rotation.
  for (int64_t k = 0; k < 128; k++) {
    CHECK_EQ(at(0, 1, 0, k), 1.0f);
    CHECK_EQ(std::abs(at(0, 1, 1, k)), 0.0f);
  }
  // Sample 1, token T + 4: pair 8 is axis 1's first (ω = 1): angle 2.5; pair 9: 2.5·10000^(−2/56);
  // pair 36 is axis 2's first: angle 1.
  const double a9 = 2.5 * std::pow(10000.0, -2.0 / 56);
  CHECK_EQ(at(1, 6, 0, 16), static_cast<float>(std::cos(2.5)));
  CHECK_EQ(at(1, 6, 0, 17), static_cast<float>(std::cos(2.5)));
  CHECK_EQ(at(1, 6, 1, 16), static_cast<float>(-std::sin(2.5)));
  CHECK_EQ(at(1, 6, 1, 17), static_cast<float>(std::sin(2.5)));
  CHECK_EQ(at(1, 6, 1, 19), static_cast<float>(std::sin(a9)));
  CHECK_EQ(at(1, 6, 1, 73), static_cast<float>(std::sin(1.0)));
  CHECK_EQ(at(1, 6, 0, 0), 1.0f);  // axis 0 is 0 for image tokens

  const auto plain = flux_timesteps(4, 4096, false);
  CHECK(plain == std::vector<double>({1, 0.75, 0.5, 0.25, 0}));
  const auto shifted = flux_timesteps(2, 4096, true);  // mu = 1.15 at 4096 tokens
  CHECK_EQ(shifted[0], 1.0);
  CHECK(std::abs(shifted[1] - std::exp(1.15) / (std::exp(1.15) + 1)) < 1e-15);
  CHECK_EQ(shifted[2], 0.0);
}

// All blocks' gates are zero (zero modulation weights and biases), so x passes them unchanged:
// one step from t = 1 to 0 is img ← img − v with v = W_f·((1 + scale)·LN(W_in·img + b_in) +
// shift) + b_f, shift and scale the final adaLN bias's halves.
void forward_by_hand() {
  TempDir dir;
  FluxSpec s;
  s.depth = 1;
  const int64_t H = 128;
  auto tensors = flux_tensors(s, [](FluxTensor& t) {
    const bool keep = t.name.rfind("img_in.", 0) == 0 ||
                      t.name.rfind("final_layer.linear.", 0) == 0 ||
                      t.name == "final_layer.adaLN_modulation.1.bias";
    const bool zero_gates = t.name.find("_mod.lin.") != std::string::npos ||
                            t.name.find("modulation.lin.") != std::string::npos ||
                            t.name == "final_layer.adaLN_modulation.1.weight";
    if (zero_gates && !keep) std::fill(t.values.begin(), t.values.end(), 0.0f);
  });
  std::map<std::string, const std::vector<float>*> w;
  for (const auto& t : tensors) w[t.name] = &t.values;
  const std::string path = dir.file("hand.safetensors");
  write_flux_safetensors(path, tensors);
  auto model = Model::open(path);
  CpuDevice device({kCapacity, 0, 2});
  RunRequest r = flux_request(*model, per_base(*model, false));
  r.steps = 1;
  r.job.batch = 1;
  const auto out = run(device, *model, r);
  CHECK(out.shape == std::vector<int64_t>({1, 6, 64}));
  CHECK_EQ(out.name, std::string("img"));

  std::vector<float> img(6 * 64);
  initial_input(r.seed, img.data(), img.size());  // the first generated input
  const auto& win = *w["img_in.weight"];
  const auto& bin = *w["img_in.bias"];
  const auto& wf = *w["final_layer.linear.weight"];
  const auto& bf = *w["final_layer.linear.bias"];
  const auto& ada = *w["final_layer.adaLN_modulation.1.bias"];
  double worst = 0;
  for (int64_t l = 0; l < 6; l++) {
    std::vector<double> h(H);
    double mean = 0, var = 0;
    for (int64_t o = 0; o < H; o++) {
      double acc = bin[o];
      for (int64_t c = 0; c < 64; c++) acc += double(win[o * 64 + c]) * img[l * 64 + c];
      h[o] = acc;
      mean += acc / H;
    }
    for (double v : h) var += (v - mean) * (v - mean) / H;
    for (int64_t o = 0; o < H; o++) {
      h[o] = (1 + ada[H + o]) * (h[o] - mean) / std::sqrt(var + 1e-6) + ada[o];
    }
    for (int64_t c = 0; c < 64; c++) {
      double v = bf[c];
      for (int64_t o = 0; o < H; o++) v += double(wf[c * H + o]) * h[o];
      worst = std::max(worst, std::abs(out.output[l * 64 + c] - (img[l * 64 + c] - v)));
    }
  }
  std::fprintf(stderr, "  forward by hand: worst |Δ| %.2e\n", worst);
  CHECK(worst < 1e-4);
}

void same_bits_under_every_plan() {
  TempDir dir;
  FluxSpec s;
  const std::string path = dir.file("plans.gguf");
  write_flux_gguf(path, flux_tensors(s), GGML_TYPE_Q8_0);
  auto model = Model::open(path);
  CpuDevice device({kCapacity, 0, 2});
  const auto resident = run(device, *model, flux_request(*model, one_segment(*model, true)));
  CHECK(resident.shape == std::vector<int64_t>({2, 6, 64}));
  bool finite = true;
  for (float v : resident.output) finite = finite && std::isfinite(v);
  CHECK(finite);
  const std::vector<RunOutput> others = {
      run(device, *model, flux_request(*model, per_base(*model, false))),
      run(device, *model, flux_request(*model, per_base(*model, false), Execution::kLookahead)),
      run(device, *model,
          flux_request(*model, plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}}),
                       Execution::kPooled, 2)),
  };
  for (const auto& o : others) {
    CHECK(std::memcmp(o.output.data(), resident.output.data(), o.output.size() * 4) == 0);
  }
  // The inputs the request gives replace the generated ones, and the guidance scale matters.
  RunRequest r = flux_request(*model, per_base(*model, false));
  r.sampler.guidance = 1.0;
  const auto g1 = run(device, *model, r);
  CHECK(std::memcmp(g1.output.data(), resident.output.data(), g1.output.size() * 4) != 0);
  r.inputs["img"] = std::vector<float>(2 * 6 * 64, 0.25f);
  const auto given = run(device, *model, r);
  CHECK(std::memcmp(given.output.data(), g1.output.data(), g1.output.size() * 4) != 0);
  r.inputs["txt"] = std::vector<float>(5, 0.0f);
  CHECK_THROWS(InvalidArgumentError, run(device, *model, r), "input \"txt\" has 5 values");
  device.residency().clear();  // the pooled plan's resident weights stay for later jobs
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

// FLUX.1-dev at 1024×1024 (L = 4096, T = 512), measured without weights.
void measured_at_1024() {
  auto arch = arch_from_config(
      "flux", {{"hidden", 3072}, {"depth", 19}, {"depth_single", 38}, {"guidance", 1}});
  const auto m = measure_segments(*arch, JobShape{1, 4096, 512});
  CHECK_EQ(m.size(), size_t(59));
  const double H = 3072, N = 4608, L = 4096, T = 512;
  // Matmul FLOPs (2 per multiply-add; the modulations' are per sample, negligible) plus
  // attention's 4·N²·H.
  const double dbl = 2 * N * (3 * H * H + H * H + 8 * H * H) + 4 * N * N * H;
  const double single = 2 * N * (7 * H * H + 5 * H * H) + 4 * N * N * H;
  const double prelude = 2 * (L * 64 * H + T * 4096 * H);
  std::fprintf(stderr,
               "  1024²: prelude %.1f GFLOP, double %.1f (formula %.1f), single %.1f (%.1f)\n",
               m[0].flops / 1e9, m[1].flops / 1e9, dbl / 1e9, m[20].flops / 1e9, single / 1e9);
  CHECK(std::abs(m[1].flops / dbl - 1) < 0.05);
  CHECK(std::abs(m[20].flops / single - 1) < 0.05);
  CHECK(std::abs(m[0].flops / prelude - 1) < 0.05);
  for (size_t i : {size_t(1), size_t(20), size_t(58)}) {
    std::fprintf(
        stderr, "  %s: compute buffer %.0f MiB, output %.0f MiB, reads %.0f MiB + %.0f MiB\n",
        m[i].name.c_str(), m[i].compute_buffer_bytes / 1048576.0, m[i].output_bytes / 1048576.0,
        m[i].prev_cut_bytes / 1048576.0, m[i].external_bytes / 1048576.0);
  }
  // No [N, N] scores: a double block's intermediates stay far below one sample's 2 GB of them.
  CHECK(m[1].compute_buffer_bytes < (uint64_t{1500} << 20));
  CHECK(m[1].compute_buffer_bytes > (uint64_t{200} << 20));
  CHECK_EQ(m[1].output_bytes, uint64_t(N * H * 4));
  CHECK_EQ(m[58].output_bytes, uint64_t(L * 64 * 4));
}

}  // namespace

int main() {
  return run_all({
      {"binds_every_layout", binds_every_layout},
      {"errors_name_the_tensor", errors_name_the_tensor},
      {"job_state_and_schedule", job_state_and_schedule},
      {"forward_by_hand", forward_by_hand},
      {"same_bits_under_every_plan", same_bits_under_every_plan},
      {"measured_at_1024", measured_at_1024},
  });
}
