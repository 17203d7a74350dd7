// Binding a model file to its architecture (Ferry's DiT, from safetensors or GGUF): base segments
// with their tensors' ggml types and shapes checked against the architecture's, the packed layout
// (256-byte aligned tensors, spans, page-congruent big tensors), the architecture's configuration,
// every way a file can fail to be a DiT (a ModelFormatError naming the file and the problem), and
// the host params cache segments are streamed from.
#include <unistd.h>

#include <cstring>
#include <iterator>

#include "ferry/errors.h"
#include "ferry/model.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

// Packed layout invariants of every segment of `model`.
void check_layout(const Model& model) {
  for (const auto& s : model.base_segments()) {
    uint64_t sum = 0, end = 0;
    for (const auto& t : s.tensors) {
      CHECK_EQ(t.packed_offset % kPackAlignment, uint64_t{0});
      CHECK(t.packed_offset >= end);  // in order, never overlapping
      CHECK(t.span_bytes >= t.nbytes);
      const ggml_tensor desc = tensor_descriptor(t);
      CHECK_EQ(uint64_t{ggml_nbytes(&desc)}, t.nbytes);
      // The CPU layout (the default) spans exactly the tensor's bytes.
      CHECK_EQ(t.span_bytes, t.nbytes);
      end = t.packed_offset + t.span_bytes;
      sum += t.nbytes;
    }
    CHECK_EQ(sum, s.param_bytes);
    CHECK(s.packed_bytes >= end && s.packed_bytes % kPackAlignment == 0);
    CHECK(s.packed_bytes < end + kPackAlignment);
  }
}

void binds_segments() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  write_dit(path, spec);
  auto model = Model::open(path);
  CHECK(model->format() == ModelFormat::kSafetensors);
  CHECK_EQ(model->path(), path);
  CHECK_EQ(model->layout_name(), std::string("CPU"));
  const ModelArch& arch = model->arch();
  CHECK_EQ(arch.name(), std::string("ferry-dit"));
  CHECK_EQ(arch.describe(), std::string("ferry-dit 3 blocks, hidden 32, heads 4, channels 8"));
  const auto config = arch.config();
  CHECK_EQ(config.at("hidden"), 32.0);
  CHECK_EQ(config.at("heads"), 4.0);
  CHECK_EQ(config.at("channels"), 8.0);
  CHECK_EQ(config.at("blocks"), 3.0);
  CHECK_EQ(arch.segments().size(), size_t{5});
  const auto& segs = model->base_segments();
  CHECK_EQ(segs.size(), size_t{5});
  const char* names[] = {"prelude", "blocks.0", "blocks.1", "blocks.2", "final"};
  for (size_t i = 0; i < segs.size(); i++) {
    CHECK_EQ(segs[i].name, std::string(names[i]));
    CHECK_EQ(segs[i].name, arch.segments()[i].name);
    CHECK_EQ(segs[i].kind, arch.segments()[i].kind);
  }
  CHECK_EQ(segs[0].kind, std::string("prelude"));
  CHECK_EQ(segs[2].kind, std::string("block"));
  CHECK_EQ(segs[4].kind, std::string("final"));
  CHECK_EQ(segs[1].tensors.size(), size_t{10});
  const SegmentTensor& qkv = segs[1].tensors[1];
  CHECK_EQ(qkv.name, std::string("blocks.0.attn.qkv.weight"));
  CHECK(qkv.type == GGML_TYPE_F32);
  CHECK_EQ(qkv.n_dims, 2);
  // PyTorch [out, in] = [96, 32] is ggml ne {32, 96}.
  CHECK(qkv.ne[0] == 32 && qkv.ne[1] == 96 && qkv.ne[2] == 1 && qkv.ne[3] == 1);
  const SegmentTensor& norm = segs[1].tensors[0];
  CHECK(norm.n_dims == 1 && norm.ne[0] == 32 && norm.ne[1] == 1);
  CHECK_EQ(qkv.file_offset, model->file().find(qkv.name)->begin);
  const uint64_t D = 32, C = 8;
  CHECK_EQ(segs[0].param_bytes, (D * C + D) * 4);
  CHECK_EQ(segs[1].param_bytes,
           (D + 3 * D * D + 3 * D + D * D + D + D + 4 * D * D + 4 * D + 4 * D * D + D) * 4);
  CHECK_EQ(segs[4].param_bytes, (D + C * D + C) * 4);
  check_layout(*model);
  // Small tensors (< 4 MiB) are simply packed back to back at the alignment.
  CHECK_EQ(segs[1].tensors[0].packed_offset, uint64_t{0});
  CHECK_EQ(segs[1].tensors[1].packed_offset, uint64_t{256});
  CHECK_EQ(segs[1].tensors[2].packed_offset, uint64_t{256} + align_up(96 * 32 * 4, 256));
}

void params_cache() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  spec.dtype = "BF16";
  write_dit(path, spec);
  auto model = Model::open(path);
  CHECK_EQ(model->host_cache_bytes(), uint64_t{0});
  CHECK(!model->params_cached(1));
  const auto cold = model->prepare_params(1);
  CHECK_EQ(cold.disk_bytes, model->base_segments()[1].param_bytes);
  CHECK(model->params_cached(1));
  CHECK_EQ(model->host_cache_bytes(), model->base_segments()[1].packed_bytes);
  CHECK_EQ(reinterpret_cast<uintptr_t>(cold.data) % kPackAlignment, uintptr_t{0});
  const auto warm = model->prepare_params(1);
  CHECK_EQ(warm.disk_bytes, uint64_t{0});
  CHECK(warm.data == cold.data);
  // The packed bytes are the file's bytes; the gaps between tensors are zero.
  const auto& seg = model->base_segments()[1];
  uint64_t end = 0;
  for (const auto& t : seg.tensors) {
    std::vector<uint8_t> expected(t.nbytes);
    model->file().read(t.file_offset, expected.data(), expected.size());
    CHECK(std::memcmp(cold.data + t.packed_offset, expected.data(), t.nbytes) == 0);
    CHECK(t.type == GGML_TYPE_BF16);
    for (uint64_t i = end; i < t.packed_offset; i++) CHECK_EQ(cold.data[i], uint8_t{0});
    end = t.packed_offset + t.nbytes;
  }
  CHECK_THROWS(InvalidArgumentError, model->prepare_params(5), "out of range");
}

void cache_read_checks_bounds() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_dit(path, DitSpec{});
  auto model = Model::open(path);
  // The file shrinks after open: the lazy read fails cleanly, and a retry fails the same way.
  CHECK(truncate(path.c_str(),
                 static_cast<off_t>(model->base_segments()[2].tensors[0].file_offset)) == 0);
  CHECK_THROWS(ModelFormatError, model->prepare_params(3), "truncated");
  CHECK_THROWS(ModelFormatError, model->prepare_params(3), "truncated");
  CHECK(!model->params_cached(3));
  CHECK_EQ(model->host_cache_bytes(), uint64_t{0});
  CHECK(model->prepare_params(0).disk_bytes > 0);  // segments before the cut still load
}

// Writes a DiT with one thing changed by `edit` and expects ModelFormatError containing `needle`
// and the path.
void expect_bad(
    const std::function<void(std::map<std::string, std::string>&, std::vector<WriteTensor>&)>& edit,
    const std::string& needle) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  auto metadata = dit_metadata(spec);
  auto tensors = dit_tensors(spec);
  edit(metadata, tensors);
  write_safetensors(path, metadata, tensors);
  bool thrown = false;
  try {
    Model::open(path);
  } catch (const ModelFormatError& e) {
    thrown = true;
    const std::string msg = e.what();
    if (msg.find(needle) == std::string::npos || msg.find(path) == std::string::npos) {
      report_failure(__FILE__, __LINE__, "message \"" + msg + "\" lacks \"" + needle + "\"");
    }
  }
  if (!thrown) report_failure(__FILE__, __LINE__, "no ModelFormatError for: " + needle);
}

WriteTensor& named(std::vector<WriteTensor>& tensors, const std::string& name) {
  for (auto& t : tensors) {
    if (t.name == name) return t;
  }
  std::abort();
}

void rejects_bad_layouts() {
  using M = std::map<std::string, std::string>;
  using T = std::vector<WriteTensor>;
  expect_bad([](M& m, T&) { m.erase("ferry.arch"); },
             "not a model Ferry can run: no __metadata__ \"ferry.arch\"");
  expect_bad([](M& m, T&) { m["ferry.arch"] = "unet"; },
             "unsupported architecture \"ferry.arch\" = \"unet\" (expected \"dit\")");
  expect_bad([](M& m, T&) { m.erase("ferry.heads"); }, "__metadata__ lacks \"ferry.heads\"");
  expect_bad([](M& m, T&) { m["ferry.hidden"] = "0x20"; },
             "\"ferry.hidden\" = \"0x20\" is not a positive decimal integer");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "0"; }, "not a positive decimal integer");
  expect_bad([](M& m, T&) { m["ferry.hidden"] = " 32"; }, "not a positive decimal integer");
  expect_bad([](M& m, T&) { m["ferry.heads"] = "5"; },
             "\"ferry.heads\" = 5 does not divide \"ferry.hidden\" = 32");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "4"; }, "missing tensor \"blocks.3.norm1.weight\"");
  // An absurd block count is refused before the architecture builds that many segment specs.
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "999999999999999"; },
             "declares 999999999999999 blocks but holds only 35 tensors");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "2"; }, "unexpected tensors \"blocks.2.");
  expect_bad(
      [](M&, T& t) {
        auto& w = named(t, "blocks.1.attn.qkv.weight");
        w.shape = {96, 16};
        w.data.resize(96 * 16 * 4);
      },
      "(ferry-dit 3 blocks, hidden 32, heads 4, channels 8): tensor \"blocks.1.attn.qkv.weight\" "
      "has shape [96, 16], expected [96, 32]");
  expect_bad(
      [](M&, T& t) {
        auto& w = named(t, "blocks.0.norm1.weight");
        w.shape = {32, 1};
      },
      "tensor \"blocks.0.norm1.weight\" has shape [32, 1], expected [32]");
  expect_bad([](M&, T& t) { named(t, "final.out.bias").dtype = "I32"; },
             "tensor \"final.out.bias\" has dtype I32; weights must be F32, F16 or BF16");
  expect_bad(
      [](M&, T& t) {
        auto& w = named(t, "blocks.2.mlp.fc1.weight");
        w.dtype = "F64";
        w.data += w.data;
      },
      "tensor \"blocks.2.mlp.fc1.weight\" has dtype F64; weights must be F32, F16 or BF16");
  expect_bad([](M&, T& t) { t.erase(t.begin()); }, "missing tensor \"embed.weight\"");
  expect_bad(
      [](M&, T& t) {
        t.push_back({"extra", "F32", {1}, std::string(4, '\0')});
      },
      "unexpected tensor \"extra\"");
  expect_bad(
      [](M&, T& t) {
        for (int i = 0; i < 7; i++)
          t.push_back({"extra" + std::to_string(i), "F32", {1}, std::string(4, '\0')});
      },
      "unexpected tensors \"extra0\", \"extra1\", \"extra2\", \"extra3\", \"extra4\", …");
}

// Leading dimensions of 1 (row-major; trailing ones in ggml order) describe the same bytes, and
// are accepted: [1, 32] binds as the vector [32].
void unit_dimensions() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  auto tensors = dit_tensors(spec);
  named(tensors, "blocks.0.norm1.weight").shape = {1, 32};
  named(tensors, "blocks.1.attn.qkv.weight").shape = {1, 96, 32};
  write_safetensors(path, dit_metadata(spec), tensors);
  auto model = Model::open(path);
  const auto& norm = model->base_segments()[1].tensors[0];
  CHECK(norm.n_dims == 1 && norm.ne[0] == 32 && norm.ne[1] == 1);
  const auto& qkv = model->base_segments()[2].tensors[1];
  CHECK(qkv.n_dims == 2 && qkv.ne[0] == 32 && qkv.ne[1] == 96 && qkv.ne[2] == 1);
}

void mixed_dtypes() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  auto tensors = dit_tensors(spec);
  // Norms in F32, the rest in F16: each tensor keeps its own type.
  for (auto& t : tensors) {
    if (t.name.find("norm") != std::string::npos) continue;
    t.data = encode(decode_f32(t.data), "F16");
    t.dtype = "F16";
  }
  write_safetensors(path, dit_metadata(spec), tensors);
  auto model = Model::open(path);
  const auto& block = model->base_segments()[1].tensors;
  CHECK(block[0].type == GGML_TYPE_F32);  // norm1
  CHECK(block[1].type == GGML_TYPE_F16);  // qkv
  CHECK(block[2].type == GGML_TYPE_F16);  // qkv bias
  CHECK_EQ(block[1].nbytes, uint64_t{96 * 32 * 2});
  check_layout(*model);
}

// A safetensors DiT and the same weights in GGUF: the same segments, tensors, shapes and bytes
// (f32), and the GGUF types gen-model writes (f16, bf16, q8_0, q4_0, q4_K).
void gguf_binding() {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 64;
  spec.channels = 8;
  const std::string st = dir.file("dit.safetensors");
  write_dit(st, spec);
  const std::string gg = dir.file("dit.gguf");
  write_dit_gguf(gg, spec, "f32");
  auto a = Model::open(st);
  auto b = Model::open(gg);
  CHECK(a->format() == ModelFormat::kSafetensors);
  CHECK(b->format() == ModelFormat::kGguf);
  CHECK_EQ(b->arch().describe(), a->arch().describe());
  CHECK_EQ(b->arch().config().at("hidden"), 64.0);
  CHECK_EQ(b->arch().config().at("blocks"), 3.0);
  const auto& sa = a->base_segments();
  const auto& sb = b->base_segments();
  CHECK_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size() && i < sb.size(); i++) {
    CHECK_EQ(sa[i].name, sb[i].name);
    CHECK_EQ(sa[i].kind, sb[i].kind);
    CHECK_EQ(sa[i].param_bytes, sb[i].param_bytes);
    CHECK_EQ(sa[i].packed_bytes, sb[i].packed_bytes);
    const auto pa = a->prepare_params(i);
    const auto pb = b->prepare_params(i);
    for (size_t k = 0; k < sa[i].tensors.size(); k++) {
      const SegmentTensor& ta = sa[i].tensors[k];
      const SegmentTensor& tb = sb[i].tensors[k];
      CHECK(ta.name == tb.name && ta.type == tb.type && ta.n_dims == tb.n_dims);
      CHECK(std::memcmp(ta.ne, tb.ne, sizeof ta.ne) == 0);
      CHECK_EQ(ta.nbytes, tb.nbytes);
      CHECK(std::memcmp(pa.data + ta.packed_offset, pb.data + tb.packed_offset, ta.nbytes) == 0);
    }
  }
  check_layout(*b);

  for (const char* type : {"f16", "bf16", "q8_0", "q4_0", "q4_K"}) {
    ggml_type want = GGML_TYPE_F32;
    for (int i = 0; i < GGML_TYPE_COUNT; i++) {
      if (ggml_blck_size(ggml_type(i)) != 0 && std::string(ggml_type_name(ggml_type(i))) == type) {
        want = ggml_type(i);
      }
    }
    const bool quantized = ggml_is_quantized(want);
    const std::string path = dir.file(std::string("dit-") + type + ".gguf");
    write_dit_gguf(path, spec, type, /*alignment=*/64);
    auto m = Model::open(path);
    CHECK(m->file().gguf() != nullptr && m->file().gguf()->alignment == 64);
    // Every tensor as gen-model stores it: quantized where its rows are whole blocks (with
    // hidden 64, q4_K's 256-element blocks fit only fc2's rows of 4·64), f16 for other matrices,
    // f32 vectors.
    for (const auto& seg : m->base_segments()) {
      for (const auto& t : seg.tensors) {
        const std::vector<int64_t> shape(std::reverse_iterator<const int64_t*>(t.ne + t.n_dims),
                                         std::reverse_iterator<const int64_t*>(t.ne));
        CHECK(t.type == dit_gguf_tensor_type(want, shape));
        CHECK_EQ(t.nbytes, uint64_t{ggml_row_size(t.type, t.ne[0]) * uint64_t(t.ne[1])});
      }
    }
    const auto& block = m->base_segments()[1].tensors;
    CHECK(block[0].type == (quantized ? GGML_TYPE_F32 : want));  // norm1
    CHECK(block[8].type == want);                                // fc2: rows of 256
    CHECK_EQ(block[8].nbytes, uint64_t{ggml_row_size(want, 256) * 64});
    // embed.weight [64, 8]: rows of 8 are not whole blocks, so gen-model stores it f16.
    CHECK(m->base_segments()[0].tensors[0].type == (quantized ? GGML_TYPE_F16 : want));
    CHECK(m->prepare_params(1).disk_bytes == m->base_segments()[1].param_bytes);
    const TensorInfo* info = m->file().find("blocks.0.mlp.fc2.weight");
    CHECK(info && info->ggml_type_name == type && info->ggml_type == int(want));
    check_layout(*m);
  }
}

void gguf_bad_layouts() {
  TempDir dir;
  const std::string path = dir.file("bad.gguf");
  DitSpec spec;
  auto expect = [&](const std::string& bytes, const std::string& needle) {
    write_file(path, bytes);
    bool thrown = false;
    try {
      Model::open(path);
    } catch (const ModelFormatError& e) {
      thrown = true;
      const std::string msg = e.what();
      if (msg.find(needle) == std::string::npos || msg.find(path) == std::string::npos) {
        report_failure(__FILE__, __LINE__, "message \"" + msg + "\" lacks \"" + needle + "\"");
      }
    }
    if (!thrown) report_failure(__FILE__, __LINE__, "no ModelFormatError for: " + needle);
  };
  // No architecture / another one / a missing, non-integer or zero dimension.
  GgufBuilder none;
  none.tensor("w", {32}, 0, std::string(128, '\0'));
  expect(none.bytes(), "unsupported GGUF architecture none (Ferry runs \"ferry-dit\"");
  GgufBuilder other;
  other.kv_string("general.architecture", "unet");
  expect(other.bytes(), "unsupported GGUF architecture \"unet\"");
  GgufBuilder lacks;
  lacks.kv_string("general.architecture", "ferry-dit");
  expect(lacks.bytes(), "metadata lacks \"ferry-dit.blocks\"");
  GgufBuilder text;
  text.kv_string("general.architecture", "ferry-dit");
  text.kv_string("ferry-dit.blocks", "3");
  expect(text.bytes(),
         "metadata \"ferry-dit.blocks\" must be a positive integer, got string \"3\"");
  GgufBuilder zero;
  zero.kv_string("general.architecture", "ferry-dit");
  zero.kv_u32("ferry-dit.blocks", 0);
  expect(zero.bytes(), "must be a positive integer, got uint32 0");
  GgufBuilder negative;
  negative.kv_string("general.architecture", "ferry-dit");
  Bytes minus;
  minus.u32(static_cast<uint32_t>(-3));
  negative.kv_raw("ferry-dit.blocks", GgufBuilder::kI32, minus.b);
  expect(negative.bytes(), "must be a positive integer, got int32 -3");
  GgufBuilder heads;
  heads.kv_string("general.architecture", "ferry-dit");
  for (const char* k : {"blocks", "hidden", "heads", "channels"}) {
    heads.kv_u32(std::string("ferry-dit.") + k, std::string(k) == "heads" ? 5 : 32);
  }
  expect(heads.bytes(), "\"ferry-dit.heads\" = 5 does not divide \"ferry-dit.hidden\" = 32");
  GgufBuilder many;
  many.kv_string("general.architecture", "ferry-dit");
  for (const char* k : {"blocks", "hidden", "heads", "channels"}) {
    many.kv_u32(std::string("ferry-dit.") + k, std::string(k) == "blocks" ? 4000000000u : 32);
  }
  expect(many.bytes(), "declares 4000000000 blocks but holds only 0 tensors");

  // Rewrites tensor `name`'s ggml type in its tensor info (past its n_dims and ne).
  auto retype = [](std::string b, const std::string& name, int dims, uint32_t type) {
    const size_t at = b.find(name) + name.size() + 4 + 8 * static_cast<size_t>(dims);
    std::memcpy(&b[at], &type, 4);
    return b;
  };
  const std::string f32 = dit_gguf_bytes(spec, "f32");
  // f32 → i32 (same size): a bias of a type that is neither f32, f16 nor bf16.
  expect(retype(f32, "final.out.bias", 1, GGML_TYPE_I32),
         "tensor \"final.out.bias\" is i32; norm weights and biases must be f32, f16 or bf16");
  // A matrix of a type ggml's CPU backend cannot multiply with.
  expect(retype(f32, "blocks.1.attn.out.weight", 2, GGML_TYPE_I32),
         "tensor \"blocks.1.attn.out.weight\" is i32, a type ggml cannot multiply with");
  {
    // A quantized vector: valid GGUF (norm1 as q8_0 [32], 34 bytes), but not a valid DiT.
    GgufBuilder g;
    g.kv_string("general.architecture", "ferry-dit");
    g.kv_u32("ferry-dit.blocks", 3);
    g.kv_u32("ferry-dit.hidden", 32);
    g.kv_u32("ferry-dit.heads", 4);
    g.kv_u32("ferry-dit.channels", 8);
    for (const auto& t : dit_tensors(spec)) {
      const std::vector<uint64_t> ne(t.shape.rbegin(), t.shape.rend());
      const ggml_type type = t.name == "blocks.0.norm1.weight" ? GGML_TYPE_Q8_0 : GGML_TYPE_F32;
      g.tensor(t.name, ne, type, ggml_encode(type, decode_f32(t.data), int64_t(ne[0])));
    }
    expect(g.bytes(),
           "tensor \"blocks.0.norm1.weight\" is q8_0; norm weights and biases must be f32, f16 or "
           "bf16");
  }
  {
    // A missing and an unexpected tensor.
    GgufBuilder g;
    g.kv_string("general.architecture", "ferry-dit");
    g.kv_u32("ferry-dit.blocks", 1);
    g.kv_u32("ferry-dit.hidden", 32);
    g.kv_u32("ferry-dit.heads", 4);
    g.kv_u32("ferry-dit.channels", 8);
    DitSpec one = spec;
    one.blocks = 1;
    for (const auto& t : dit_tensors(one)) {
      if (t.name == "blocks.0.mlp.fc2.bias") continue;
      g.tensor(t.name, std::vector<uint64_t>(t.shape.rbegin(), t.shape.rend()), 0, t.data);
    }
    expect(g.bytes(), "missing tensor \"blocks.0.mlp.fc2.bias\"");
    g.tensor("blocks.0.mlp.fc2.bias", {32}, 0, std::string(128, '\0'));
    g.tensor("lora.weight", {32}, 0, std::string(128, '\0'));
    expect(g.bytes(), "unexpected tensor \"lora.weight\"");
  }
  {
    // A shape that is not the architecture's (ne reversed: [96, 32] written as ne {96, 32}).
    GgufBuilder g;
    g.kv_string("general.architecture", "ferry-dit");
    g.kv_u32("ferry-dit.blocks", 1);
    g.kv_u32("ferry-dit.hidden", 32);
    g.kv_u32("ferry-dit.heads", 4);
    g.kv_u32("ferry-dit.channels", 8);
    DitSpec one = spec;
    one.blocks = 1;
    for (const auto& t : dit_tensors(one)) {
      std::vector<uint64_t> ne(t.shape.rbegin(), t.shape.rend());
      if (t.name == "blocks.0.attn.qkv.weight") ne = {96, 32};
      g.tensor(t.name, ne, 0, t.data);
    }
    expect(g.bytes(), "tensor \"blocks.0.attn.qkv.weight\" has shape [32, 96], expected [96, 32]");
  }
}

void arch_from_configuration() {
  auto arch = arch_from_config("ferry-dit",
                               {{"hidden", 64}, {"heads", 4}, {"channels", 16}, {"blocks", 2}});
  CHECK_EQ(arch->name(), std::string("ferry-dit"));
  CHECK_EQ(arch->describe(), std::string("ferry-dit 2 blocks, hidden 64, heads 4, channels 16"));
  CHECK_EQ(arch->segments().size(), size_t{4});
  CHECK_EQ(arch->segments()[1].weights.size(), size_t{10});
  CHECK(arch->segments()[1].weights[1].matrix && !arch->segments()[1].weights[0].matrix);
  JobShape job;
  job.batch = 2;
  job.tokens = 5;
  const auto acts = arch->activations(job);
  CHECK_EQ(acts.size(), size_t{3});
  CHECK_EQ(acts[0].name, std::string("z"));
  CHECK(acts[0].role == ActivationSpec::Role::kLatent);
  CHECK(acts[0].ne[0] == 16 && acts[0].ne[1] == 5 && acts[0].ne[2] == 2);
  CHECK(acts[1].name == "x" && acts[1].ne[0] == 64 && acts[1].role == ActivationSpec::Role::kState);
  CHECK(acts[2].name == "y" && acts[2].role == ActivationSpec::Role::kOutput);
  CHECK(arch_from_config("dit", arch->config())->describe() == arch->describe());
  CHECK_THROWS(InvalidArgumentError, arch_from_config("sd3", arch->config()),
               "unknown architecture \"sd3\" (known: ferry-dit, flux)");
  CHECK_THROWS(InvalidArgumentError, arch_from_config("flux", arch->config()),
               "flux: the configuration lacks \"depth\"");
  CHECK_THROWS(InvalidArgumentError,
               arch_from_config("ferry-dit", {{"hidden", 64}, {"heads", 4}, {"channels", 16}}),
               "the configuration lacks \"blocks\"");
  CHECK_THROWS(InvalidArgumentError,
               arch_from_config("ferry-dit",
                                {{"hidden", 64.5}, {"heads", 4}, {"channels", 16}, {"blocks", 2}}),
               "\"hidden\" must be a positive integer");
  CHECK_THROWS(InvalidArgumentError,
               arch_from_config("ferry-dit",
                                {{"hidden", 64}, {"heads", 5}, {"channels", 16}, {"blocks", 2}}),
               "heads must divide hidden");
  job.tokens = 0;
  CHECK_THROWS(InvalidArgumentError, arch->check_job(job), "batch and tokens must be ≥ 1");
  job.tokens = int64_t{1} << 31;
  CHECK_THROWS(InvalidArgumentError, arch->check_job(job), "the attention scores is too large");
}

}  // namespace

int main() {
  return run_all({
      {"binds_segments", binds_segments},
      {"params_cache", params_cache},
      {"cache_read_checks_bounds", cache_read_checks_bounds},
      {"rejects_bad_layouts", rejects_bad_layouts},
      {"unit_dimensions", unit_dimensions},
      {"mixed_dtypes", mixed_dtypes},
      {"gguf_binding", gguf_binding},
      {"gguf_bad_layouts", gguf_bad_layouts},
      {"arch_from_configuration", arch_from_configuration},
  });
}
