// Binding a safetensors file to the DiT layout (base segments, shapes, dtypes) and the host params
// cache that segments are streamed from.
#include <cstring>

#include "ferry/errors.h"
#include "ferry/model.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

void binds_segments() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  write_dit(path, spec);
  auto model = DitModel::open(path);
  CHECK_EQ(model->dims().hidden, int64_t{32});
  CHECK_EQ(model->dims().heads, int64_t{4});
  CHECK_EQ(model->dims().channels, int64_t{8});
  CHECK_EQ(model->dims().blocks, int64_t{3});
  const auto& segs = model->base_segments();
  CHECK_EQ(segs.size(), size_t{5});
  const char* names[] = {"prelude", "blocks.0", "blocks.1", "blocks.2", "final"};
  for (size_t i = 0; i < segs.size(); i++) CHECK_EQ(segs[i].name, std::string(names[i]));
  CHECK(segs[0].kind == SegmentKind::kPrelude);
  CHECK(segs[2].kind == SegmentKind::kBlock);
  CHECK(segs[4].kind == SegmentKind::kFinal);
  CHECK_EQ(segs[1].tensors.size(), size_t{10});
  CHECK_EQ(segs[1].tensors[1].name, std::string("blocks.0.attn.qkv.weight"));
  CHECK(segs[1].tensors[1].shape == (std::vector<int64_t>{96, 32}));
  const uint64_t D = 32, C = 8;
  CHECK_EQ(segs[0].param_bytes, (D * C + D) * 4);
  CHECK_EQ(segs[1].param_bytes,
           (D + 3 * D * D + 3 * D + D * D + D + D + 4 * D * D + 4 * D + 4 * D * D + D) * 4);
  CHECK_EQ(segs[4].param_bytes, (D + C * D + C) * 4);
  for (const auto& s : segs) {
    uint64_t sum = 0;
    for (const auto& t : s.tensors) {
      CHECK_EQ(t.packed_offset % kPackAlignment, uint64_t{0});
      sum += t.nbytes;
    }
    CHECK_EQ(sum, s.param_bytes);
    CHECK(s.packed_bytes >= s.param_bytes && s.packed_bytes % kPackAlignment == 0);
  }
}

void params_cache() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  spec.dtype = "BF16";
  write_dit(path, spec);
  auto model = DitModel::open(path);
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
  // The packed bytes are the file's bytes.
  for (const auto& t : model->base_segments()[1].tensors) {
    std::vector<uint8_t> expected(t.nbytes);
    model->file().read(t.file_offset, expected.data(), expected.size());
    CHECK(std::memcmp(cold.data + t.packed_offset, expected.data(), t.nbytes) == 0);
    CHECK(t.dtype == DType::BF16);
  }
  CHECK_THROWS(InvalidArgumentError, model->prepare_params(5), "out of range");
}

void cache_read_checks_bounds() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_dit(path, DitSpec{});
  auto model = DitModel::open(path);
  // The file shrinks after open: the lazy read fails cleanly, and a retry fails the same way.
  CHECK(truncate(path.c_str(),
                 static_cast<off_t>(model->base_segments()[2].tensors[0].file_offset)) == 0);
  CHECK_THROWS(ModelFormatError, model->prepare_params(3), "truncated");
  CHECK_THROWS(ModelFormatError, model->prepare_params(3), "truncated");
  CHECK(!model->params_cached(3));
  CHECK_EQ(model->host_cache_bytes(), uint64_t{0});
  CHECK(model->prepare_params(0).disk_bytes > 0);  // segments before the cut still load
}

// Writes a DiT with one thing changed by `edit` and expects ModelFormatError containing `needle`.
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
    DitModel::open(path);
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
  expect_bad([](M& m, T&) { m.erase("ferry.arch"); }, "not a Ferry DiT model");
  expect_bad([](M& m, T&) { m["ferry.arch"] = "unet"; }, "unsupported architecture");
  expect_bad([](M& m, T&) { m.erase("ferry.heads"); }, "lacks \"ferry.heads\"");
  expect_bad([](M& m, T&) { m["ferry.hidden"] = "0x20"; }, "not a positive decimal integer");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "0"; }, "not a positive decimal integer");
  expect_bad([](M& m, T&) { m["ferry.heads"] = "5"; }, "does not divide");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "4"; }, "missing tensor \"blocks.3.norm1.weight\"");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "999999999999999"; }, "missing tensor \"blocks.3.");
  expect_bad([](M& m, T&) { m["ferry.blocks"] = "2"; }, "unexpected tensors \"blocks.2.");
  expect_bad(
      [](M&, T& t) {
        auto& w = named(t, "blocks.1.attn.qkv.weight");
        w.shape = {96, 16};
        w.data.resize(96 * 16 * 4);
      },
      "(DiT 3 blocks, hidden 32, heads 4, channels 8): tensor \"blocks.1.attn.qkv.weight\" has "
      "shape [96, 16], expected [96, 32]");
  expect_bad(
      [](M&, T& t) {
        auto& w = named(t, "final.out.bias");
        w.dtype = "I32";
      },
      "tensor \"final.out.bias\" has dtype I32; DiT weights must be F32, F16, BF16, Q8_0 or Q4_0");
  expect_bad([](M&, T& t) { t.erase(t.begin()); }, "missing tensor \"embed.weight\"");
  expect_bad(
      [](M&, T& t) {
        t.push_back({"extra", "F32", {1}, std::string(4, '\0')});
      },
      "unexpected tensor \"extra\"");
}

void mixed_dtypes() {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  auto tensors = dit_tensors(spec);
  // Norms in F32, the rest in F16: each tensor keeps its own dtype.
  for (auto& t : tensors) {
    if (t.name.find("norm") != std::string::npos) continue;
    std::vector<float> v(t.data.size() / 4);
    std::memcpy(v.data(), t.data.data(), t.data.size());
    t.dtype = "F16";
    t.data = encode(v, "F16");
  }
  write_safetensors(path, dit_metadata(spec), tensors);
  auto model = DitModel::open(path);
  const auto& block = model->base_segments()[1].tensors;
  CHECK(block[0].dtype == DType::F32);  // norm1
  CHECK(block[1].dtype == DType::F16);  // qkv
  CHECK_EQ(block[1].nbytes, uint64_t{96 * 32 * 2});
}

}  // namespace

int main() {
  return run_all({
      {"binds_segments", binds_segments},
      {"params_cache", params_cache},
      {"cache_read_checks_bounds", cache_read_checks_bounds},
      {"rejects_bad_layouts", rejects_bad_layouts},
      {"mixed_dtypes", mixed_dtypes},
  });
}
