// ferry_native_bench: the executor bench without Node, for a GPU machine or a CPU one.
//
// Job mode (default): one device, one generated DiT (GGUF, written to a temp file) or --model, and
// three runs of the same job side by side, each streaming the same bytes per step:
//   serial     sd.cpp before PR #1905 (`sdcpp`): per segment, a fresh buffer, copy, wait, compute;
//              the resident blocks are a prefix (sd.cpp's chunk-K shape)
//   lookahead  sd.cpp after PR #1905 (`sdcpp-prefetch`): the same, with the next streamed
//              segment's copy queued during the current compute
//   pooled     Ferry (`ferry`): --slots staging slots allocated once, a copy thread running ahead;
//              the same number of blocks resident, spread evenly between the streamed ones
// With --vram the resident blocks are as many as fit beside the job's buffers (all streamed if
// none fit); without it --resident-fraction of them, and the budget is what that needs. The
// prelude and final segments are resident when they fit. On the CPU device the link is emulated:
// --link-gbps, or by default a rate at which the streamed bytes take as long as a step's compute
// (measured with everything resident). On a GPU the link is the GPU's own.
//
// Prints per mode the mean warm step time (steps 2..S), the h2d rate (bytes over the time the
// copies took), the stall (time compute waited for weights) and compute per step; the ratios
// serial/pooled and lookahead/pooled; the lower bound max(compute, streamed / peak copy rate);
// and checks the three latents are bitwise equal (exit status 3 if not). --json prints one JSON
// object instead of the table.
//
// OMP_WAIT_POLICY defaults to PASSIVE, as in the addon (see main).
//
// --matmul: GFLOP/s of a 64×1024×1024 matrix product (64 activation rows, f32, times a
// 1024×1024 weight) on ggml's CPU backend, for each weight type of --types (default f32, f16,
// bf16, q8_0, q4_0, q4_K, q6_K, iq4_nl).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../tests/test_support.h"
#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ferry/gpu_device.h"
#include "ferry/measure.h"
#include "ferry/runner.h"
#include "ggml-cpu.h"

using namespace ferry;

namespace {

struct Options {
  std::string device = "cpu";
  int ordinal = 0;
  std::string model;  // empty: generate
  std::string out;    // keep the generated model here
  int64_t blocks = 8, hidden = 1024, heads = 16, channels = 16;
  std::string dtype = "f16";
  int64_t batch = 1, tokens = 64, steps = 4;
  unsigned threads = 0;
  double resident_fraction = 0.5;
  uint32_t slots = 2;
  double link_gbps = -1;  // cpu: < 0 = match compute
  size_t vram = 0;        // 0: what the plan needs
  bool json = false;
  bool matmul = false;
  std::vector<std::string> types = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_K", "q6_K", "iq4_nl"};
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(
      stderr,
      "ferry_native_bench: %s\n"
      "usage: ferry_native_bench [--device cpu|gpu] [--ordinal N] [--vram SIZE] [--link-gbps X]\n"
      "         [--model FILE | --hidden D --blocks N --heads H --channels C --dtype TYPE [--out "
      "FILE]]\n"
      "         [--batch B] [--tokens T] [--steps S] [--threads N] [--slots D]\n"
      "         [--resident-fraction R] [--json]\n"
      "       ferry_native_bench --matmul [--threads N] [--types f32,f16,q8_0,...] [--json]\n"
      "  TYPE: f32, f16, bf16 or any ggml weight type (q8_0, q4_K, ...); SIZE: 512MiB, 2GiB, 3G, "
      "bytes\n",
      why.c_str());
  std::exit(2);
}

size_t parse_size(const std::string& text) {
  size_t end = 0;
  double v = 0;
  try {
    v = std::stod(text, &end);
  } catch (const std::exception&) {
    usage("bad size " + text);
  }
  std::string unit = text.substr(end);
  for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double scale = 1;
  if (unit == "k" || unit == "kib")
    scale = 1024.0;
  else if (unit == "m" || unit == "mib")
    scale = 1024.0 * 1024;
  else if (unit == "g" || unit == "gib")
    scale = 1024.0 * 1024 * 1024;
  else if (unit == "kb")
    scale = 1e3;
  else if (unit == "mb")
    scale = 1e6;
  else if (unit == "gb")
    scale = 1e9;
  else if (!unit.empty() && unit != "b")
    usage("bad size unit in " + text);
  if (!(v > 0)) usage("bad size " + text);
  return static_cast<size_t>(v * scale);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value for " + a);
      return argv[++i];
    };
    auto integer = [&]() -> int64_t {
      const std::string v = value();
      try {
        return std::stoll(v);
      } catch (const std::exception&) {
        usage("bad number " + v + " for " + a);
      }
    };
    auto real = [&]() -> double {
      const std::string v = value();
      try {
        return std::stod(v);
      } catch (const std::exception&) {
        usage("bad number " + v + " for " + a);
      }
    };
    if (a == "--device")
      o.device = value();
    else if (a == "--ordinal")
      o.ordinal = static_cast<int>(integer());
    else if (a == "--model")
      o.model = value();
    else if (a == "--out")
      o.out = value();
    else if (a == "--blocks")
      o.blocks = integer();
    else if (a == "--hidden")
      o.hidden = integer();
    else if (a == "--heads")
      o.heads = integer();
    else if (a == "--channels")
      o.channels = integer();
    else if (a == "--dtype")
      o.dtype = value();
    else if (a == "--batch")
      o.batch = integer();
    else if (a == "--tokens")
      o.tokens = integer();
    else if (a == "--steps")
      o.steps = std::max<int64_t>(2, integer());
    else if (a == "--threads")
      o.threads = static_cast<unsigned>(integer());
    else if (a == "--resident-fraction")
      o.resident_fraction = real();
    else if (a == "--slots")
      o.slots = static_cast<uint32_t>(integer());
    else if (a == "--link-gbps")
      o.link_gbps = real();
    else if (a == "--vram")
      o.vram = parse_size(value());
    else if (a == "--json")
      o.json = true;
    else if (a == "--matmul")
      o.matmul = true;
    else if (a == "--types") {
      o.types.clear();
      std::stringstream list(value());
      std::string t;
      while (std::getline(list, t, ',')) o.types.push_back(t);
    } else if (a == "--help" || a == "-h")
      usage("help");
    else
      usage("unknown option " + a);
  }
  if (o.device != "cpu" && o.device != "gpu") usage("--device must be cpu or gpu");
  if (o.slots < 1 || o.slots > kMaxSlots) usage("--slots must be between 1 and 16");
  if (o.resident_fraction < 0 || o.resident_fraction > 1)
    usage("--resident-fraction must be in [0, 1]");
  if (o.blocks < 1 || o.hidden < 1 || o.heads < 1 || o.channels < 1 || o.hidden % o.heads != 0) {
    usage("--blocks, --hidden, --heads, --channels must be positive, heads dividing hidden");
  }
  if (o.threads == 0) o.threads = std::max(1u, std::thread::hardware_concurrency());
  return o;
}

bool type_by_name(const std::string& name, ggml_type* out) {
  if (!ggml_type_from_name(name, out)) return false;
  return ggml_type_is_weight_type(*out) && !ggml_quantize_requires_imatrix(*out);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// ---- the model ----

// Writes the DiT of `o` as GGUF, one tensor at a time (a multi-GB model never sits in memory
// whole): the layout of ferry_test::dit_gguf_bytes, the values of ferry_test::dit_tensors.
void write_model(const std::string& path, const Options& o, ggml_type type) {
  ferry_test::DitSpec spec;
  spec.hidden = o.hidden;
  spec.heads = o.heads;
  spec.channels = o.channels;
  spec.blocks = o.blocks;
  const int64_t D = o.hidden, C = o.channels;
  struct Info {
    std::string name;
    std::vector<int64_t> shape;  // row-major
    float scale, offset;
  };
  const float in_d = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<Info> infos;
  infos.push_back({"embed.weight", {D, C}, 1.0f / std::sqrt(static_cast<float>(C)), 0});
  infos.push_back({"embed.bias", {D}, 0.1f, 0});
  for (int64_t i = 0; i < o.blocks; i++) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    infos.push_back({p + "norm1.weight", {D}, 0.1f, 1.0f});
    infos.push_back({p + "attn.qkv.weight", {3 * D, D}, in_d, 0});
    infos.push_back({p + "attn.qkv.bias", {3 * D}, 0.1f, 0});
    infos.push_back({p + "attn.out.weight", {D, D}, in_d, 0});
    infos.push_back({p + "attn.out.bias", {D}, 0.1f, 0});
    infos.push_back({p + "norm2.weight", {D}, 0.1f, 1.0f});
    infos.push_back({p + "mlp.fc1.weight", {4 * D, D}, in_d, 0});
    infos.push_back({p + "mlp.fc1.bias", {4 * D}, 0.1f, 0});
    infos.push_back({p + "mlp.fc2.weight", {D, 4 * D}, in_d / 2, 0});
    infos.push_back({p + "mlp.fc2.bias", {D}, 0.1f, 0});
  }
  infos.push_back({"final.norm.weight", {D}, 0.1f, 1.0f});
  infos.push_back({"final.out.weight", {C, D}, in_d, 0});
  infos.push_back({"final.out.bias", {C}, 0.1f, 0});

  const uint64_t alignment = 32;
  auto pad = [&](uint64_t n) { return (n + alignment - 1) / alignment * alignment; };
  ferry_test::Bytes h;
  h.raw("GGUF", 4);
  h.u32(3);
  h.u64(infos.size());
  h.u64(5);
  auto kv_u32 = [&](const std::string& k, uint32_t v) {
    h.str(k);
    h.u32(ferry_test::GgufBuilder::kU32);
    h.u32(v);
  };
  h.str("general.architecture");
  h.u32(ferry_test::GgufBuilder::kString);
  h.str("ferry-dit");
  kv_u32("ferry-dit.blocks", static_cast<uint32_t>(o.blocks));
  kv_u32("ferry-dit.hidden", static_cast<uint32_t>(o.hidden));
  kv_u32("ferry-dit.heads", static_cast<uint32_t>(o.heads));
  kv_u32("ferry-dit.channels", static_cast<uint32_t>(o.channels));
  uint64_t at = 0;
  std::vector<ggml_type> stored;
  for (const Info& t : infos) {
    const ggml_type st = ferry_test::dit_gguf_tensor_type(type, t.shape);
    stored.push_back(st);
    h.str(t.name);
    h.u32(static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) h.u64(static_cast<uint64_t>(*it));
    h.u32(static_cast<uint32_t>(st));
    h.u64(at);
    const int64_t row = t.shape.back();
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    at += pad(ggml_row_size(st, row) * static_cast<uint64_t>(n / row));
  }
  h.b.resize(pad(h.b.size()), '\0');
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(h.b.data(), static_cast<std::streamsize>(h.b.size()));
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t i = 0; i < infos.size(); i++) {
    const Info& t = infos[i];
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = t.offset + t.scale * u(rng);
    std::string data = ferry_test::ggml_encode(stored[i], v, t.shape.back());
    data.resize(pad(data.size()), '\0');
    file.write(data.data(), static_cast<std::streamsize>(data.size()));
  }
  if (!file) throw IoError(errno, "write", path);
}

// ---- the runs ----

struct Measured {
  std::vector<StepReport> reports;
  RunOutput output;
  double step_s = 0;     // mean over steps 2..S
  double compute_s = 0;  // Σ compute per step, mean over steps 2..S
  double stall_s = 0;
  double h2d_bytes = 0;  // per step
  double h2d_s = 0;      // Σ transfer time per step
  double h2d_gbps() const { return h2d_s > 0 ? h2d_bytes / h2d_s / 1e9 : 0; }
};

Measured run(Device& device, Model& model, const Options& o, std::vector<PlanSegment> segments,
             Execution execution, uint32_t slots, int64_t steps) {
  RunRequest r;
  r.job.batch = o.batch;
  r.job.tokens = o.tokens;
  r.steps = steps;
  r.seed = 1;
  r.segments = std::move(segments);
  r.execution = execution;
  r.slots = slots;
  Measured m;
  {
    DeviceLease lease(device);
    m.output = run_job(lease, model, r, nullptr,
                       [&](StepReport&& s) { m.reports.push_back(std::move(s)); });
  }
  const double n = static_cast<double>(m.reports.size() - 1);
  for (size_t s = 1; s < m.reports.size(); s++) {
    const StepReport& rep = m.reports[s];
    m.step_s += (rep.end_us - rep.start_us) / 1e6 / n;
    m.stall_s += rep.stall_us / 1e6 / n;
    m.h2d_bytes += static_cast<double>(rep.h2d_bytes) / n;
    for (const RunEvent& e : rep.events) {
      if (e.kind == EventKind::kCompute) m.compute_s += (e.end_us - e.start_us) / 1e6 / n;
      if (e.kind == EventKind::kH2D) m.h2d_s += (e.end_us - e.start_us) / 1e6 / n;
    }
  }
  return m;
}

std::vector<PlanSegment> plan(const std::vector<bool>& resident) {
  std::vector<PlanSegment> out;
  for (size_t i = 0; i < resident.size(); i++) {
    out.push_back({static_cast<int64_t>(i), static_cast<int64_t>(i), resident[i]});
  }
  return out;
}

// Prelude and final resident (small); k of the n blocks: a prefix, or spread evenly (block j
// resident when floor((j+1)·k/n) > floor(j·k/n)).
std::vector<bool> resident_set(size_t segments, size_t k, bool spread) {
  const size_t n = segments - 2;
  std::vector<bool> r(segments, false);
  r.front() = r.back() = true;
  for (size_t j = 0; j < n; j++) r[1 + j] = spread ? (j + 1) * k / n > j * k / n : j < k;
  return r;
}

std::string steps_json(const Measured& m) {
  std::string s = "[";
  for (size_t i = 1; i < m.reports.size(); i++) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.6f", i > 1 ? ", " : "",
                  (m.reports[i].end_us - m.reports[i].start_us) / 1e6);
    s += buf;
  }
  return s + "]";
}

std::string mode_json(const Measured& m) {
  char buf[512];
  std::snprintf(
      buf, sizeof buf,
      "{\"step_s\": %.6f, \"compute_s\": %.6f, \"stall_s\": %.6f, \"h2d_bytes\": %.0f, "
      "\"h2d_s\": %.6f, \"h2d_gbps\": %.4f, \"compute_buffer_bytes\": %llu, \"steps_s\": ",
      m.step_s, m.compute_s, m.stall_s, m.h2d_bytes, m.h2d_s, m.h2d_gbps(),
      static_cast<unsigned long long>(m.output.compute_buffer_bytes));
  return buf + steps_json(m) + "}";
}

bool same_bits(const RunOutput& a, const RunOutput& b) {
  return a.output.size() == b.output.size() &&
         std::memcmp(a.output.data(), b.output.data(), a.output.size() * sizeof(float)) == 0;
}

std::shared_ptr<Device> open_device(const Options& o, size_t capacity, double link) {
  if (o.device == "gpu") return std::make_shared<GpuDevice>(GpuDeviceOptions{o.ordinal, capacity});
  return std::make_shared<CpuDevice>(CpuDeviceOptions{capacity, link, o.threads});
}

int job_bench(const Options& o) {
  // No GPU: say so before writing a model for it (the constructor's DeviceUnavailableError).
  if (o.device == "gpu" && gpu_device_count() <= o.ordinal)
    GpuDevice(GpuDeviceOptions{o.ordinal, 0});
  ferry_test::TempDir dir;
  std::string path = o.model;
  if (path.empty()) {
    ggml_type type;
    if (!type_by_name(o.dtype, &type))
      usage("--dtype " + o.dtype + " is not a weight type ggml can quantize to");
    path = o.out.empty() ? dir.file("bench.gguf") : o.out;
    std::fprintf(stderr, "writing a %s DiT (%lld blocks, hidden %lld) to %s\n", o.dtype.c_str(),
                 static_cast<long long>(o.blocks), static_cast<long long>(o.hidden), path.c_str());
    write_model(path, o, type);
  }
  // The model's shape, for the budget (a first open, laid out for the CPU).
  auto probe = Model::open(path);
  const size_t segments = probe->base_segments().size();
  const size_t blocks = segments - 2;
  uint64_t params = 0, largest = 0, all_packed = 0;
  std::vector<uint64_t> packed;
  for (const auto& b : probe->base_segments()) {
    params += b.param_bytes;
    packed.push_back(align_up(b.packed_bytes, kPackAlignment));
    largest = std::max<uint64_t>(largest, packed.back());
    all_packed += packed.back();
  }
  JobShape job;
  job.batch = o.batch;
  job.tokens = o.tokens;
  uint64_t compute_buffer = 0;
  double flops = 0;
  for (const auto& m : measure_segments(probe->arch(), job)) {
    compute_buffer = std::max(compute_buffer, m.compute_buffer_bytes);
    flops += m.flops;
  }
  uint64_t activations = 0;
  for (const auto& a : probe->arch().activations(job)) {
    activations += align_up(static_cast<uint64_t>(a.elements()) * 4, 256);
  }
  probe.reset();
  // Job buffers beside the resident weights: slots (or the fresh buffers of a lookahead), the
  // compute buffer, activations, and slack for the arena's fragmentation (a run that still does
  // not fit is retried with one resident block fewer).
  const uint64_t job_bytes = std::max<uint64_t>(o.slots, 2) * largest + compute_buffer * 5 / 4 +
                             activations + (uint64_t{2} << 20);
  auto resident_bytes = [&](size_t k) {
    // Packed sizes, not param bytes: the arena holds whole packed buffers.
    uint64_t n = 0;
    const auto set = resident_set(segments, k, true);
    for (size_t i = 0; i < segments; i++) {
      if (set[i]) n += packed[i];
    }
    return n;
  };
  size_t k = static_cast<size_t>(std::llround(o.resident_fraction * static_cast<double>(blocks)));
  size_t capacity = o.vram;
  if (capacity == 0) {
    capacity = static_cast<size_t>(resident_bytes(k) + job_bytes);
  } else {
    k = blocks;
    while (k > 0 && resident_bytes(k) + job_bytes > capacity) k--;
  }

  // Compute per step with everything on the device at full copy speed (CPU: sets the link).
  double link = o.link_gbps;
  uint64_t streamed = 0;
  std::shared_ptr<Device> device;
  std::shared_ptr<Model> model;
  auto open_all = [&](double rate) {
    model.reset();
    device = open_device(o, capacity, rate);
    Model::Options options;
    options.layout = ggml_backend_buffer_get_type(device->memory());
    options.load = Model::Load::kEager;
    options.allocator = device_host_allocator(device);
    model = Model::open(path, options);
  };
  if (o.device == "cpu" && link < 0) {
    // On a device large enough for all of it (the CPU arena only reserves address space).
    auto calibration =
        std::make_shared<CpuDevice>(CpuDeviceOptions{all_packed + job_bytes, 0, o.threads});
    auto m = Model::open(path);
    const Measured all =
        run(*calibration, *m, o, plan(std::vector<bool>(segments, true)), Execution::kPooled, 1, 3);
    const auto set = resident_set(segments, k, true);
    uint64_t s = 0;
    for (size_t i = 0; i < segments; i++) {
      if (!set[i]) s += m->base_segments()[i].param_bytes;
    }
    link = s > 0 && all.compute_s > 0 ? static_cast<double>(s) / all.compute_s / 1e9 : 0;
    std::fprintf(stderr, "compute %.4f s/step with everything resident: link %.3f GB/s\n",
                 all.compute_s, link);
  }
  if (link < 0) link = 0;
  open_all(link);
  const double peak = device->measure_copy_rate(std::min<size_t>(size_t{64} << 20, capacity / 4));

  // Serial, lookahead, pooled; fewer resident blocks if a run does not fit.
  Measured serial, lookahead, pooled;
  for (;;) {
    try {
      const auto prefix = resident_set(segments, k, false);
      const auto spread = resident_set(segments, k, true);
      streamed = 0;
      for (size_t i = 0; i < segments; i++) {
        if (!spread[i]) streamed += model->base_segments()[i].param_bytes;
      }
      device->residency().clear();
      serial = run(*device, *model, o, plan(prefix), Execution::kSerial, 0, o.steps);
      lookahead = run(*device, *model, o, plan(prefix), Execution::kLookahead, 0, o.steps);
      device->residency().clear();
      pooled = run(*device, *model, o, plan(spread), Execution::kPooled, o.slots, o.steps);
      device->residency().clear();
      break;
    } catch (const DeviceOutOfMemoryError& e) {
      if (k == 0) throw;
      std::fprintf(stderr, "%zu resident blocks do not fit (%s); trying %zu\n", k, e.what(), k - 1);
      k--;
    }
  }
  const bool equal =
      same_bits(serial.output, pooled.output) && same_bits(lookahead.output, pooled.output);
  const double bound =
      std::max(pooled.compute_s, peak > 0 ? static_cast<double>(streamed) / (peak * 1e9) : 0.0);
  const std::string backend = device->backend_name();
  if (o.json) {
    std::printf(
        "{\n"
        "  \"device\": %s, \"backend\": %s, \"dtype\": %s, \"hidden\": %lld, \"blocks\": %lld, "
        "\"heads\": %lld, \"channels\": %lld,\n"
        "  \"batch\": %lld, \"tokens\": %lld, \"steps\": %lld, \"threads\": %u, \"slots\": %u,\n"
        "  \"vram_bytes\": %zu, \"params_bytes\": %llu, \"resident_blocks\": %zu, "
        "\"streamed_bytes_per_step\": %llu, \"flops_per_step\": %.0f,\n"
        "  \"link_gbps\": %.4f, \"h2d_peak_gbps\": %.4f, \"lower_bound_s\": %.6f,\n"
        "  \"serial\": %s,\n  \"lookahead\": %s,\n  \"pooled\": %s,\n"
        "  \"serial_over_pooled\": %.4f, \"lookahead_over_pooled\": %.4f, "
        "\"pooled_over_lower_bound\": %.4f, \"pooled_h2d_efficiency\": %.4f, \"bitwise_equal\": "
        "%s\n"
        "}\n",
        json_string(o.device).c_str(), json_string(backend).c_str(),
        json_string(o.model.empty() ? o.dtype : "file").c_str(), static_cast<long long>(o.hidden),
        static_cast<long long>(o.blocks), static_cast<long long>(o.heads),
        static_cast<long long>(o.channels), static_cast<long long>(o.batch),
        static_cast<long long>(o.tokens), static_cast<long long>(o.steps), o.threads, o.slots,
        capacity, static_cast<unsigned long long>(params), k,
        static_cast<unsigned long long>(streamed), flops, link, peak, bound,
        mode_json(serial).c_str(), mode_json(lookahead).c_str(), mode_json(pooled).c_str(),
        serial.step_s / pooled.step_s, lookahead.step_s / pooled.step_s, pooled.step_s / bound,
        peak > 0 ? pooled.h2d_gbps() / peak : 0, equal ? "true" : "false");
  } else {
    std::printf(
        "%s (%s), %s DiT: %lld blocks (%zu resident), hidden %lld; batch %lld, %lld tokens, "
        "%lld steps; budget %.1f MiB\n",
        o.device.c_str(), backend.c_str(), o.model.empty() ? o.dtype.c_str() : "file",
        static_cast<long long>(o.blocks), k, static_cast<long long>(o.hidden),
        static_cast<long long>(o.batch), static_cast<long long>(o.tokens),
        static_cast<long long>(o.steps), capacity / 1048576.0);
    std::printf("streamed %.1f MiB/step, link %.3f GB/s (peak measured %.3f), %.2f GFLOP/step\n",
                streamed / 1048576.0, link, peak, flops / 1e9);
    std::printf("%-10s %10s %10s %10s %10s\n", "mode", "step s", "compute s", "stall s",
                "h2d GB/s");
    for (const auto& [name, m] : {std::pair<const char*, const Measured*>{"serial", &serial},
                                  {"lookahead", &lookahead},
                                  {"pooled", &pooled}}) {
      std::printf("%-10s %10.4f %10.4f %10.4f %10.3f\n", name, m->step_s, m->compute_s, m->stall_s,
                  m->h2d_gbps());
    }
    std::printf(
        "serial/pooled %.3f, lookahead/pooled %.3f, pooled/lower bound %.3f (bound %.4f s)\n",
        serial.step_s / pooled.step_s, lookahead.step_s / pooled.step_s, pooled.step_s / bound,
        bound);
    std::printf("outputs bitwise equal: %s\n", equal ? "yes" : "NO");
  }
  return equal ? 0 : 3;
}

// ---- matmul ----

struct MatmulResult {
  std::string type;
  double median_ms = 0;
  double best_ms = 0;
  int reps = 0;
  double gflops(double ms) const { return 2.0 * 64 * 1024 * 1024 / (ms / 1e3) / 1e9; }
};

// Times one product after two warm-up runs, at least 5 runs and 0.5 s; reports the median run
// (typical) and the fastest (the machine undisturbed: other processes only ever slow a run).
MatmulResult time_matmul(ggml_backend_t backend, ggml_type type) {
  constexpr int64_t kM = 64, kK = 1024, kN = 1024;
  ggml_init_params p{ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(p);
  ggml_tensor* w = ggml_new_tensor_2d(ctx, type, kK, kN);
  ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kK, kM);
  ggml_tensor* y = ggml_mul_mat(ctx, w, x);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_build_forward_expand(graph, y);
  ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> wv(static_cast<size_t>(kK * kN)), xv(static_cast<size_t>(kK * kM));
  for (auto& v : wv) v = u(rng) / 32;
  for (auto& v : xv) v = u(rng);
  const std::string wq = ferry_test::ggml_encode(type, wv, kK);
  ggml_backend_tensor_set(w, wq.data(), 0, wq.size());
  ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * 4);
  for (int i = 0; i < 2; i++) ggml_backend_graph_compute(backend, graph);  // warm-up
  MatmulResult r;
  r.type = ggml_type_name(type);
  std::vector<double> ms;
  double elapsed = 0;
  while (ms.size() < 5 || (elapsed < 0.5 && ms.size() < 10000)) {
    const auto a = std::chrono::steady_clock::now();
    ggml_backend_graph_compute(backend, graph);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    ms.push_back(t * 1e3);
    elapsed += t;
  }
  std::sort(ms.begin(), ms.end());
  r.reps = static_cast<int>(ms.size());
  r.median_ms = ms[ms.size() / 2];
  r.best_ms = ms.front();
  ggml_backend_buffer_free(buffer);
  ggml_free(ctx);
  return r;
}

int matmul_bench(const Options& o) {
  ggml_setup();
  ggml_backend_t backend = ggml_backend_cpu_init();
  ggml_backend_cpu_set_n_threads(backend, static_cast<int>(o.threads));
  std::vector<MatmulResult> results;
  if (!o.json) {
    std::printf("64×1024×1024 matmul, %u threads: GFLOP/s (median run, fastest run)\n", o.threads);
  }
  for (const std::string& name : o.types) {
    ggml_type type;
    if (!type_by_name(name, &type)) usage(name + " is not a weight type ggml can quantize to");
    results.push_back(time_matmul(backend, type));
    const MatmulResult& r = results.back();
    if (!o.json) {
      std::printf("%-8s %8.2f %8.2f GFLOP/s  (%.3f / %.3f ms, %d runs)\n", r.type.c_str(),
                  r.gflops(r.median_ms), r.gflops(r.best_ms), r.median_ms, r.best_ms, r.reps);
    }
  }
  ggml_backend_free(backend);
  if (o.json) {
    std::printf(
        "{\"matmul\": {\"m\": 64, \"k\": 1024, \"n\": 1024, \"threads\": %u, \"results\": [",
        o.threads);
    for (size_t i = 0; i < results.size(); i++) {
      const MatmulResult& r = results[i];
      std::printf(
          "%s{\"type\": %s, \"median_ms\": %.4f, \"best_ms\": %.4f, \"gflops\": %.3f, "
          "\"gflops_best\": %.3f, \"runs\": %d}",
          i ? ", " : "", json_string(r.type).c_str(), r.median_ms, r.best_ms, r.gflops(r.median_ms),
          r.gflops(r.best_ms), r.reps);
    }
    std::printf("]}}\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // ggml's compute threads are OpenMP's, which spin at every barrier unless told to wait
  // passively — ruinous on shared cores (the addon and ctest set the same). libgomp reads the
  // policy when it loads, before main: set it and start again.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // where that fails, run on as we are
  }
  const Options o = parse(argc, argv);
  try {
    return o.matmul ? matmul_bench(o) : job_bench(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry_native_bench: %s\n", e.what());
    return 1;
  }
}
