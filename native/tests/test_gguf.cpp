// The GGUF reader: the real tiny Llama GGUF from the fixtures (another project's file), GGUF files
// written field by field (every value type, every way a header can be wrong — each a
// ModelFormatError naming the file and the problem, never a crash or a huge allocation), and the
// DiT binding of GGUF models (f32, f16, q8_0, q4_0) against the same weights in safetensors.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "ferry/errors.h"
#include "ferry/gguf.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "test_gguf_support.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

const std::string kLlama = std::string(FERRY_FIXTURES_DIR) + "/gguf/llama-2-tiny-random.gguf";

bool fixture_present() {
  if (access(kLlama.c_str(), R_OK) == 0) return true;
  std::printf("skipped: %s not found\n", kLlama.c_str());
  return false;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

GgufHeader parse_bytes(const std::string& bytes, const GgufParseOptions& options = {}) {
  return parse_gguf(
      "mem.gguf", bytes.size(),
      [&](uint64_t offset, void* dst, size_t n) {
        if (offset > bytes.size() || n > bytes.size() - offset) {
          throw ModelFormatError("test read past the end");
        }
        std::memcpy(dst, bytes.data() + offset, n);
      },
      options);
}

void real_llama_header() {
  if (!fixture_present()) return;
  GgufParseOptions keep;
  keep.keep_arrays = true;
  const GgufHeader h = read_gguf(kLlama, keep);
  CHECK_EQ(h.version, uint32_t{3});
  CHECK_EQ(h.metadata.size(), size_t{18});
  CHECK_EQ(h.tensors.size(), size_t{12});
  CHECK_EQ(h.alignment, uint64_t{32});
  CHECK_EQ(h.header_bytes, uint64_t{724398});
  CHECK_EQ(h.data_start, uint64_t{724416});
  CHECK_EQ(h.file_bytes, uint64_t{1750560});

  const GgufValue* arch = h.find("general.architecture");
  CHECK(arch && arch->type == GgufValueType::kString && arch->str == "llama");
  const GgufValue* eps = h.find("llama.attention.layer_norm_rms_epsilon");
  CHECK(eps && eps->type == GgufValueType::kFloat32);
  if (eps) CHECK_EQ(gguf_value_summary(*eps), std::string("1e-05"));
  const GgufValue* blocks = h.find("llama.block_count");
  uint64_t n = 0;
  CHECK(blocks && blocks->type == GgufValueType::kUint32 && blocks->as_uint64(&n) && n == 1);
  const GgufValue* tokens = h.find("tokenizer.ggml.tokens");
  CHECK(tokens && tokens->type == GgufValueType::kArray);
  if (tokens) {
    CHECK(tokens->item_type == GgufValueType::kString);
    CHECK_EQ(tokens->count, uint64_t{32000});
    CHECK_EQ(tokens->strings.size(), size_t{32000});
    CHECK_EQ(tokens->strings[1], std::string("<s>"));
    const std::string head = "[string × 32000] \"<unk>\", \"<s>\"";
    CHECK_EQ(gguf_value_summary(*tokens).substr(0, head.size()), head);
  }
  const GgufValue* scores = h.find("tokenizer.ggml.scores");
  CHECK(scores && scores->item_type == GgufValueType::kFloat32 && scores->raw.size() == 32000 * 4);
  const GgufValue* types = h.find("tokenizer.ggml.token_type");
  CHECK(types && types->item_type == GgufValueType::kInt32 && types->count == 32000);

  // Tensor infos: types, ggml dims, offsets (relative, aligned) and absolute ranges.
  const GgufTensorInfo* embd = h.find_tensor("token_embd.weight");
  CHECK(embd != nullptr);
  if (embd) {
    CHECK_EQ(std::string(embd->type->name), std::string("f16"));
    CHECK(embd->ne == (std::vector<int64_t>{8, 32000}));
    CHECK(embd->shape == (std::vector<int64_t>{32000, 8}));
    CHECK_EQ(embd->offset, uint64_t{0});
    CHECK_EQ(embd->begin, h.data_start);
    CHECK_EQ(embd->nbytes(), uint64_t{32000 * 8 * 2});
  }
  const GgufTensorInfo* down = h.find_tensor("blk.0.ffn_down.weight");
  CHECK(down && down->ne == (std::vector<int64_t>{32, 8}) && down->offset == 513536);
  const GgufTensorInfo* norm = h.find_tensor("output_norm.weight");
  CHECK(norm && std::string(norm->type->name) == "f32" && norm->nbytes() == 32 &&
        norm->offset == 514112);
  for (const auto& t : h.tensors) CHECK_EQ(t.offset % h.alignment, uint64_t{0});
  CHECK_EQ(h.find_tensor("output.weight")->end, h.file_bytes);

  // Without keep_arrays the arrays are walked, typed and counted, but their items are not kept.
  const GgufHeader lean = read_gguf(kLlama);
  const GgufValue* lean_tokens = lean.find("tokenizer.ggml.tokens");
  CHECK(lean_tokens && lean_tokens->count == 32000 && lean_tokens->strings.empty() &&
        !lean_tokens->items_kept);
  CHECK_EQ(gguf_value_summary(*lean_tokens), std::string("[string × 32000]"));
  CHECK_EQ(lean.data_start, h.data_start);

  // The same file through the format-independent model file.
  auto file = ModelFile::open(kLlama);
  CHECK(file->format() == ModelFormat::kGguf);
  CHECK(file->gguf() != nullptr);
  CHECK_EQ(file->tensors().size(), size_t{12});
  const TensorInfo* t = file->find("token_embd.weight");
  CHECK(t && t->ggml_type == 1 && t->ggml_type_name == "f16" && t->dtype == StDType::kF16);
  CHECK(t && t->shape == (std::vector<int64_t>{32000, 8}));
  CHECK_EQ(file->tensors().back().end, file->file_bytes());
  CHECK_EQ(file->metadata().at("general.architecture"), std::string("llama"));
  CHECK_EQ(file->metadata().at("llama.block_count"), std::string("1"));
  // A real model, but not a Ferry DiT: the binding says so.
  CHECK_THROWS(ModelFormatError, DitModel::open(kLlama),
               "not a Ferry DiT model: \"general.architecture\" is \"llama\"");
}

void truncations_are_clean_errors() {
  if (!fixture_present()) return;
  const std::string bytes = slurp(kLlama);
  TempDir dir;
  const std::string path = dir.file("cut.gguf");
  // Cut inside the header (metadata, the tokenizer arrays, tensor infos) and inside the data.
  for (size_t cut : {size_t{0}, size_t{3}, size_t{10}, size_t{30}, size_t{5000}, size_t{700000},
                     size_t{724000}, size_t{724400}, bytes.size() - 1}) {
    write_file(path, bytes.substr(0, cut));
    CHECK_THROWS(ModelFormatError, ModelFile::open(path), "cut.gguf");
  }
}

void rewritten_fields_are_clean_errors() {
  if (!fixture_present()) return;
  const std::string bytes = slurp(kLlama);
  auto with = [&](size_t offset, const std::string& patch) {
    std::string b = bytes;
    b.replace(offset, patch.size(), patch);
    return b;
  };
  CHECK_THROWS(ModelFormatError, parse_bytes(with(4, std::string("\x01\x00\x00\x00", 4))),
               "GGUF version 1 is not supported");
  CHECK_THROWS(ModelFormatError, parse_bytes(with(4, std::string("\x00\x00\x00\x03", 4))),
               "big-endian");
  CHECK_THROWS(ModelFormatError, parse_bytes(with(0, "GGUG")), "not a GGUF file");
  CHECK_THROWS(ModelFormatError,
               parse_bytes(with(8, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8))),
               "tensor count 9223372036854775807 is absurd");
  CHECK_THROWS(ModelFormatError,
               parse_bytes(with(16, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8))),
               "cannot fit");
  CHECK_THROWS(ModelFormatError,
               parse_bytes(with(24, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8))),
               "key of metadata entry #0");
  // The length of the first key (general.architecture, 20 bytes) grown past the rest of the
  // file, and an absurd item count for the tokens array.
  CHECK_THROWS(ModelFormatError,
               parse_bytes(with(24, std::string("\x00\x00\x00\x10\x00\x00\x00\x00", 8))), "claims");
  // After the key: the value type (4 bytes), the item type (4), then the count.
  const size_t tokens_count = bytes.find("tokenizer.ggml.tokens") + 21 + 4 + 4;
  CHECK_THROWS(ModelFormatError,
               parse_bytes(with(tokens_count, std::string("\x00\x00\x00\x00\x00\x01\x00\x00", 8))),
               "cannot fit in the");
  // The header cap.
  GgufParseOptions small;
  small.max_header_bytes = 100000;
  CHECK_THROWS(ModelFormatError, parse_bytes(bytes, small), "100000-byte limit");
}

// A valid header with one tensor, then variations.
GgufBuilder one_tensor() {
  GgufBuilder g;
  g.kv_string("general.architecture", "test");
  g.tensor("w", {32, 2}, 0, std::string(32 * 2 * 4, '\x01'));
  return g;
}

void every_value_type() {
  GgufBuilder g;
  Bytes v;
  v.u8(200);
  g.kv_raw("u8", GgufBuilder::kU8, v.b);
  v = {};
  v.u8(0xF6);
  g.kv_raw("i8", GgufBuilder::kI8, v.b);
  v = {};
  v.u16(65000);
  g.kv_raw("u16", GgufBuilder::kU16, v.b);
  v = {};
  v.u16(static_cast<uint16_t>(-300));
  g.kv_raw("i16", GgufBuilder::kI16, v.b);
  g.kv_u32("u32", 4000000000u);
  v = {};
  v.u32(static_cast<uint32_t>(-70000));
  g.kv_raw("i32", GgufBuilder::kI32, v.b);
  v = {};
  v.f32(0.1f);
  g.kv_raw("f32", GgufBuilder::kF32, v.b);
  v = {};
  v.u8(1);
  g.kv_raw("bool", GgufBuilder::kBool, v.b);
  g.kv_string("str", "héllo \"q\"");
  v = {};
  v.u64(18000000000000000000ull);
  g.kv_raw("u64", GgufBuilder::kU64, v.b);
  v = {};
  v.u64(static_cast<uint64_t>(-5));
  g.kv_raw("i64", GgufBuilder::kI64, v.b);
  v = {};
  v.f64(2.5);
  g.kv_raw("f64", GgufBuilder::kF64, v.b);
  v = {};  // [uint16 × 3]
  v.u32(GgufBuilder::kU16);
  v.u64(3);
  v.u16(1);
  v.u16(2);
  v.u16(3);
  g.kv_raw("arr", GgufBuilder::kArray, v.b);
  v = {};  // [array × 2] of [int8 × 1]
  v.u32(GgufBuilder::kArray);
  v.u64(2);
  for (int k = 0; k < 2; k++) {
    v.u32(GgufBuilder::kI8);
    v.u64(1);
    v.u8(static_cast<uint8_t>(-k));
  }
  g.kv_raw("nested", GgufBuilder::kArray, v.b);
  v = {};  // an empty string array
  v.u32(GgufBuilder::kString);
  v.u64(0);
  g.kv_raw("empty", GgufBuilder::kArray, v.b);
  g.version = 2;
  GgufParseOptions keep;
  keep.keep_arrays = true;
  const GgufHeader h = parse_bytes(g.bytes(), keep);
  CHECK_EQ(h.version, uint32_t{2});
  CHECK(h.tensors.empty());
  CHECK_EQ(h.metadata.size(), size_t{15});
  auto summary = [&](const char* key) { return gguf_value_summary(*h.find(key)); };
  CHECK_EQ(summary("u8"), std::string("200"));
  CHECK_EQ(summary("i8"), std::string("-10"));
  CHECK_EQ(summary("u16"), std::string("65000"));
  CHECK_EQ(summary("i16"), std::string("-300"));
  CHECK_EQ(summary("u32"), std::string("4000000000"));
  CHECK_EQ(summary("i32"), std::string("-70000"));
  CHECK_EQ(summary("f32"), std::string("0.1"));
  CHECK_EQ(summary("bool"), std::string("true"));
  CHECK_EQ(summary("str"), std::string("\"héllo \\\"q\\\"\""));
  CHECK_EQ(summary("u64"), std::string("18000000000000000000"));
  CHECK_EQ(summary("i64"), std::string("-5"));
  CHECK_EQ(summary("f64"), std::string("2.5"));
  CHECK_EQ(summary("arr"), std::string("[uint16 × 3] 1, 2, 3"));
  CHECK_EQ(summary("nested"), std::string("[array × 2] [int8 × 1], [int8 × 1]"));
  CHECK_EQ(summary("empty"), std::string("[string × 0]"));
  uint64_t n = 0;
  CHECK(!h.find("i64")->as_uint64(&n));
  CHECK(h.find("u64")->as_uint64(&n) && n == 18000000000000000000ull);
  CHECK_EQ(h.find("i32")->i, int64_t{-70000});
  CHECK_EQ(h.find("nested")->arrays.size(), size_t{2});
  CHECK_EQ(h.find("nested")->arrays[1].raw[0], uint8_t{0xFF});
}

void bad_headers_are_clean_errors() {
  auto expect = [](const std::string& bytes, const std::string& needle) {
    CHECK_THROWS(ModelFormatError, parse_bytes(bytes), needle);
  };
  {  // duplicate key
    GgufBuilder g = one_tensor();
    g.kv_string("general.architecture", "again");
    expect(g.bytes(), "duplicate metadata key \"general.architecture\"");
  }
  {  // unknown value type
    GgufBuilder g = one_tensor();
    g.kv_raw("odd", 13, "");
    expect(g.bytes(), "metadata \"odd\" has unknown value type 13");
  }
  {  // unknown array item type
    GgufBuilder g = one_tensor();
    Bytes v;
    v.u32(77);
    v.u64(1);
    g.kv_raw("arr", GgufBuilder::kArray, v.b);
    expect(g.bytes(), "has unknown item type 77");
  }
  {  // arrays nested too deep
    GgufBuilder g = one_tensor();
    Bytes v;
    for (int d = 0; d < 9; d++) {
      v.u32(GgufBuilder::kArray);
      v.u64(1);
    }
    v.u32(GgufBuilder::kU8);
    v.u64(0);
    g.kv_raw("deep", GgufBuilder::kArray, v.b);
    expect(g.bytes(), "nested deeper than 8 levels");
  }
  {  // invalid UTF-8 (an overlong '/')
    GgufBuilder g = one_tensor();
    g.kv_string("bad", std::string("\xC0\xAF", 2));
    expect(g.bytes(), "is not valid UTF-8");
  }
  {  // general.alignment of the wrong type, and not a power of two
    GgufBuilder g = one_tensor();
    Bytes v;
    v.u64(32);
    g.kv_raw("general.alignment", GgufBuilder::kU64, v.b);
    expect(g.bytes(), "\"general.alignment\" must be a uint32 power of two, got uint64 32");
    GgufBuilder h = one_tensor();
    h.kv_u32("general.alignment", 48);
    expect(h.bytes(), "must be a uint32 power of two, got uint32 48");
  }
  {  // tensor problems
    GgufBuilder g;
    g.tensor("w", {32}, 0, std::string(128, '\0'));
    g.tensor("w", {32}, 0, std::string(128, '\0'));
    expect(g.bytes(), "duplicate tensor name \"w\"");
  }
  {
    GgufBuilder g;
    g.tensor("", {32}, 0, std::string(128, '\0'));
    expect(g.bytes(), "tensor #0 has an empty name");
  }
  {
    GgufBuilder g;
    g.tensor("w", {}, 0, "");
    expect(g.bytes(), "tensor \"w\" has 0 dimensions; ggml allows 1 to 4");
    GgufBuilder h;
    h.tensor("w", {1, 1, 1, 1, 1}, 0, std::string(4, '\0'));
    expect(h.bytes(), "has 5 dimensions");
  }
  {
    GgufBuilder g;
    g.tensor("w", {uint64_t{1} << 60}, 0, "");
    expect(g.bytes(), "absurd dimension ne[0]");
    GgufBuilder h;
    h.tensor("w", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, "");
    expect(h.bytes(), "overflows int64");
  }
  {
    GgufBuilder g;
    g.tensor("w", {32}, 4, std::string(128, '\0'));
    expect(g.bytes(), "ggml type 4 (Q4_2), which ggml has removed");
    GgufBuilder h;
    h.tensor("w", {32}, 99, std::string(128, '\0'));
    expect(h.bytes(), "tensor \"w\" has unknown ggml type 99");
  }
  {
    GgufBuilder g;
    g.tensor("w", {48, 2}, 8, std::string(34 * 3, '\0'));
    expect(g.bytes(), "ne[0] = 48 is not a multiple of the q8_0 block size 32");
  }
  {  // data past the end of the file
    GgufBuilder g;
    g.tensor("w", {1024}, 0, std::string(4096, '\0'));
    std::string b = g.bytes();
    b.resize(b.size() - 1);
    expect(b, "past the end of the");
  }
  {  // a misaligned offset and overlapping tensors, by rewriting tensor-info offsets
    GgufBuilder g;
    g.tensor("a", {32}, 0, std::string(128, '\0'));
    g.tensor("b", {32}, 0, std::string(128, '\0'));
    std::string b = g.bytes();
    // Tensor infos: "a" (8 + 1 + 4 + 8 + 4 + 8 bytes) then "b"; b's offset is its last 8 bytes.
    const size_t b_offset = 24 + 33 + 33 - 8;
    std::string mis = b;
    const uint64_t sixteen = 16;
    std::memcpy(&mis[b_offset], &sixteen, 8);
    expect(mis, "tensor \"b\" data offset 16 is not a multiple of the alignment 32");
    std::string overlap = b;
    const uint64_t zero = 0;
    std::memcpy(&overlap[b_offset], &zero, 8);
    expect(overlap, "overlaps tensor");
  }
}

// A safetensors DiT and the same weights in GGUF (f32, and f32 weights through f16/q8_0/q4_0).
void dit_gguf_binding() {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 64;
  spec.channels = 8;
  const std::string st = dir.file("dit.safetensors");
  write_dit(st, spec);
  const std::string gg = dir.file("dit.gguf");
  write_file(gg, dit_gguf_bytes(spec, "f32"));
  auto a = DitModel::open(st);
  auto b = DitModel::open(gg);
  CHECK(a->format() == ModelFormat::kSafetensors);
  CHECK(b->format() == ModelFormat::kGguf);
  CHECK_EQ(b->dims().hidden, int64_t{64});
  CHECK_EQ(b->dims().blocks, int64_t{3});
  const auto& sa = a->base_segments();
  const auto& sb = b->base_segments();
  CHECK_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size() && i < sb.size(); i++) {
    CHECK_EQ(sa[i].name, sb[i].name);
    CHECK_EQ(sa[i].param_bytes, sb[i].param_bytes);
    const auto pa = a->prepare_params(i);
    const auto pb = b->prepare_params(i);
    for (size_t k = 0; k < sa[i].tensors.size(); k++) {
      const SegmentTensor& ta = sa[i].tensors[k];
      const SegmentTensor& tb = sb[i].tensors[k];
      CHECK(ta.shape == tb.shape && ta.dtype == tb.dtype && ta.nbytes == tb.nbytes);
      CHECK(std::memcmp(pa.data + ta.packed_offset, pb.data + tb.packed_offset, ta.nbytes) == 0);
    }
  }

  for (const char* type : {"f16", "q8_0", "q4_0"}) {
    const std::string path = dir.file(std::string("dit-") + type + ".gguf");
    write_file(path, dit_gguf_bytes(spec, type, /*alignment=*/64));
    auto m = DitModel::open(path);
    const auto& block = m->base_segments()[1].tensors;
    const DType want = std::string(type) == "f16"    ? DType::F16
                       : std::string(type) == "q8_0" ? DType::Q8_0
                                                     : DType::Q4_0;
    CHECK(block[0].dtype == (want == DType::F16 ? DType::F16 : DType::F32));  // norm1
    CHECK(block[1].dtype == want);                                            // qkv
    CHECK_EQ(block[1].nbytes, dtype_nbytes(want, 3 * 64 * 64));
    // embed.weight [64, 8]: rows of 8 are not whole blocks, so gen-model stores it f16.
    CHECK(m->base_segments()[0].tensors[0].dtype ==
          (want == DType::Q8_0 || want == DType::Q4_0 ? DType::F16 : want));
    CHECK(m->prepare_params(1).disk_bytes == m->base_segments()[1].param_bytes);
    const TensorInfo* info = m->file().find("blocks.0.attn.qkv.weight");
    CHECK(info && info->ggml_type_name == type);
  }
}

void dit_gguf_bad_layouts() {
  TempDir dir;
  const std::string path = dir.file("bad.gguf");
  DitSpec spec;
  auto expect = [&](const std::string& bytes, const std::string& needle) {
    write_file(path, bytes);
    CHECK_THROWS(ModelFormatError, DitModel::open(path), needle);
  };
  // No architecture / another one / a missing, non-integer or zero dimension.
  GgufBuilder none;
  none.tensor("w", {32}, 0, std::string(128, '\0'));
  expect(none.bytes(), "not a Ferry DiT model: no \"general.architecture\"");
  GgufBuilder other;
  other.kv_string("general.architecture", "unet");
  expect(other.bytes(), "\"general.architecture\" is \"unet\" (expected \"ferry-dit\")");
  GgufBuilder lacks;
  lacks.kv_string("general.architecture", "ferry-dit");
  expect(lacks.bytes(), "metadata lacks \"ferry-dit.blocks\"");
  GgufBuilder text;
  text.kv_string("general.architecture", "ferry-dit");
  text.kv_string("ferry-dit.blocks", "3");
  expect(text.bytes(), "\"ferry-dit.blocks\" must be a positive integer, got string \"3\"");
  GgufBuilder zero;
  zero.kv_string("general.architecture", "ferry-dit");
  zero.kv_u32("ferry-dit.blocks", 0);
  expect(zero.bytes(), "must be a positive integer, got uint32 0");
  GgufBuilder heads;
  heads.kv_string("general.architecture", "ferry-dit");
  for (const char* k : {"blocks", "hidden", "heads", "channels"}) {
    heads.kv_u32(std::string("ferry-dit.") + k, std::string(k) == "heads" ? 5 : 32);
  }
  expect(heads.bytes(), "\"ferry-dit.heads\" = 5 does not divide \"ferry-dit.hidden\" = 32");

  // A weight type the kernels do not compute with; a quantized 1-D tensor.
  {
    std::string b = dit_gguf_bytes(spec, "f32");
    // Rewrite final.out.bias's type (f32 → i32: same size) in its tensor info.
    const std::string name = "final.out.bias";
    const size_t at = b.rfind(name) + name.size() + 4 + 8;  // past n_dims and ne[0]
    const uint32_t i32 = 26;
    std::memcpy(&b[at], &i32, 4);
    expect(b,
           "tensor \"final.out.bias\" has dtype i32; DiT weights must be f32, f16, bf16, q8_0 "
           "or q4_0");
  }
  {
    DitSpec wide = spec;
    wide.hidden = 32;
    std::string b = dit_gguf_bytes(wide, "f32");
    // blocks.0.norm1.weight f32 [32] (128 bytes) → q8_0 [32] needs 34 bytes: valid GGUF, but a
    // quantized vector.
    const std::string name = "blocks.0.norm1.weight";
    const size_t at = b.find(name) + name.size() + 4 + 8;
    const uint32_t q8 = 8;
    std::memcpy(&b[at], &q8, 4);
    expect(b, "tensor \"blocks.0.norm1.weight\" is q8_0; only 2-D weights may be quantized");
  }
}

}  // namespace

int main() {
  return run_all({
      {"real_llama_header", real_llama_header},
      {"truncations_are_clean_errors", truncations_are_clean_errors},
      {"rewritten_fields_are_clean_errors", rewritten_fields_are_clean_errors},
      {"every_value_type", every_value_type},
      {"bad_headers_are_clean_errors", bad_headers_are_clean_errors},
      {"dit_gguf_binding", dit_gguf_binding},
      {"dit_gguf_bad_layouts", dit_gguf_bad_layouts},
  });
}
