// Binding a model file to the DiT layout (both formats), and the model's face of its params cache.
#include <algorithm>
#include <string>
#include <unordered_set>

#include "ferry/errors.h"
#include "ferry/model.h"

namespace ferry {

namespace {

const char* const kArchKey = "ferry.arch";
const char* const kGgufArchitecture = "ferry-dit";

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// The DType a tensor computes as: GGUF files name a ggml type (quantized blocks included),
// safetensors files a safetensors dtype.
bool compute_dtype(const TensorInfo& t, DType* out) {
  if (t.ggml_type >= 0) return dtype_from_ggml(static_cast<uint32_t>(t.ggml_type), out);
  switch (t.dtype) {
    case StDType::kF32:
      *out = DType::F32;
      return true;
    case StDType::kF16:
      *out = DType::F16;
      return true;
    case StDType::kBF16:
      *out = DType::BF16;
      return true;
    default:
      return false;
  }
}

// Where a tensor goes in its segment's packed buffer, after `end` (the previous tensor's end):
// the next multiple of kPackAlignment, or — for a large tensor whose file offset allows it — the
// first one congruent with the file offset modulo a page, so O_DIRECT reads land in place.
uint64_t place(uint64_t end, const SegmentTensor& t) {
  const uint64_t at = align_up(end, kPackAlignment);
  if (t.nbytes < kPackCongruentMinBytes || t.file_offset % kPackAlignment != 0) return at;
  const uint64_t page = kHostParamsAlignment;
  uint64_t p = at / page * page + t.file_offset % page;
  if (p < at) p += page;
  return p;
}

// A positive decimal integer, written plainly ("64", not "0x40", "6.4e1" or " 64"), as the
// generator writes it and lib/model/dit.ts reads it.
int64_t metadata_int(const SafetensorsFile& file, const char* key) {
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

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// Tensors of each base segment, in the order kernels.h's weight structs list them.
std::vector<TensorSpec> prelude_specs(const ModelDims& d) {
  return {{"embed.weight", {d.hidden, d.channels}}, {"embed.bias", {d.hidden}}};
}

std::vector<TensorSpec> block_specs(const ModelDims& d, int64_t i) {
  const int64_t D = d.hidden;
  const std::string p = "blocks." + std::to_string(i) + ".";
  return {
      {p + "norm1.weight", {D}},          {p + "attn.qkv.weight", {3 * D, D}},
      {p + "attn.qkv.bias", {3 * D}},     {p + "attn.out.weight", {D, D}},
      {p + "attn.out.bias", {D}},         {p + "norm2.weight", {D}},
      {p + "mlp.fc1.weight", {4 * D, D}}, {p + "mlp.fc1.bias", {4 * D}},
      {p + "mlp.fc2.weight", {D, 4 * D}}, {p + "mlp.fc2.bias", {D}},
  };
}

std::vector<TensorSpec> final_specs(const ModelDims& d) {
  return {{"final.norm.weight", {d.hidden}},
          {"final.out.weight", {d.channels, d.hidden}},
          {"final.out.bias", {d.channels}}};
}

}  // namespace

std::shared_ptr<DitModel> DitModel::open(const std::string& path) {
  return std::make_shared<DitModel>(ModelFile::open(path));
}

std::shared_ptr<DitModel> DitModel::open(const std::string& path, const Options& options) {
  auto model = std::make_shared<DitModel>(ModelFile::open(path), options.loader);
  model->set_params_backend(options.backend);
  model->set_read_ahead(options.read_ahead);
  if (options.allocator) model->set_host_allocator(options.allocator);
  model->set_verify(options.verify);
  const size_t n = model->base_segments().size();
  std::vector<size_t> order(n);
  for (size_t b = 0; b < n; b++) order[b] = b;
  switch (options.load) {
    case Load::kLazy:
      break;
    case Load::kEager:
      model->load_all();
      break;
    case Load::kBackground:
      // Base order is the order every plan runs the segments in. With the disk backend the reader
      // keeps going round, read_ahead segments ahead of the steps.
      model->prefetch(order, options.backend == Backend::kDisk);
      break;
  }
  return model;
}

DitModel::DitModel(std::unique_ptr<ModelFile> file, const LoaderOptions& loader)
    : file_(std::move(file)) {
  if (file_->format() == ModelFormat::kGguf) {
    bind_gguf();
  } else {
    bind_safetensors();
  }
  std::vector<ParamsSegmentLayout> layouts;
  layouts.reserve(segments_.size());
  for (const auto& seg : segments_) {
    ParamsSegmentLayout layout;
    layout.name = seg.name;
    layout.buffer_bytes = seg.packed_bytes;
    for (const auto& t : seg.tensors)
      layout.pieces.push_back({t.file_offset, t.packed_offset, t.nbytes});
    layouts.push_back(std::move(layout));
  }
  cache_ = std::make_unique<ParamsCache>(*file_, std::move(layouts), loader);
}

void DitModel::bind_safetensors() {
  const ModelFile& f = *file_;
  const auto arch = f.metadata().find(kArchKey);
  if (arch == f.metadata().end()) {
    throw ModelFormatError(f.path() + ": not a Ferry DiT model: __metadata__ has no \"" + kArchKey +
                           "\" (write one with `ferry gen-model`)");
  }
  if (arch->second != "dit") {
    throw ModelFormatError(f.path() + ": unsupported architecture \"" + kArchKey + "\" = \"" +
                           arch->second + "\" (expected \"dit\")");
  }
  dims_.blocks = metadata_int(f, "ferry.blocks");
  dims_.hidden = metadata_int(f, "ferry.hidden");
  dims_.heads = metadata_int(f, "ferry.heads");
  dims_.channels = metadata_int(f, "ferry.channels");
  if (dims_.hidden % dims_.heads != 0) {
    throw ModelFormatError(f.path() +
                           ": __metadata__ \"ferry.heads\" = " + std::to_string(dims_.heads) +
                           " does not divide \"ferry.hidden\" = " + std::to_string(dims_.hidden));
  }
  bind_segments(f.path());
}

void DitModel::bind_gguf() {
  const GgufHeader& g = *file_->gguf();
  const std::string& path = file_->path();
  const GgufValue* arch = g.find("general.architecture");
  if (!arch) {
    throw ModelFormatError(path +
                           ": not a Ferry DiT model: no \"general.architecture\" (write one with "
                           "`ferry gen-model --format gguf`)");
  }
  if (arch->type != GgufValueType::kString || arch->str != kGgufArchitecture) {
    throw ModelFormatError(path + ": not a Ferry DiT model: \"general.architecture\" is " +
                           (arch->type == GgufValueType::kString
                                ? "\"" + arch->str + "\""
                                : std::string("a ") + gguf_value_type_name(arch->type)) +
                           " (expected \"" + kGgufArchitecture + "\")");
  }
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
  dims_.blocks = read("blocks");
  dims_.hidden = read("hidden");
  dims_.heads = read("heads");
  dims_.channels = read("channels");
  if (dims_.hidden % dims_.heads != 0) {
    throw ModelFormatError(
        path + ": \"ferry-dit.heads\" = " + std::to_string(dims_.heads) +
        " does not divide \"ferry-dit.hidden\" = " + std::to_string(dims_.hidden));
  }
  bind_segments(path);
}

void DitModel::bind_segments(const std::string& path) {
  const ModelFile& f = *file_;
  const bool gguf = f.format() == ModelFormat::kGguf;
  const std::string where = path + " (DiT " + std::to_string(dims_.blocks) + " blocks, hidden " +
                            std::to_string(dims_.hidden) + ", heads " +
                            std::to_string(dims_.heads) + ", channels " +
                            std::to_string(dims_.channels) + ")";

  std::unordered_set<std::string> used;
  auto bind = [&](std::string name, SegmentKind kind, const std::vector<TensorSpec>& specs) {
    BaseSegment seg;
    seg.name = std::move(name);
    seg.kind = kind;
    uint64_t end = 0;
    for (const auto& spec : specs) {
      const TensorInfo* t = f.find(spec.name);
      if (!t) throw ModelFormatError(where + ": missing tensor \"" + spec.name + "\"");
      if (t->shape != spec.shape) {
        throw ModelFormatError(where + ": tensor \"" + spec.name + "\" has shape " +
                               shape_text(t->shape) + ", expected " + shape_text(spec.shape));
      }
      SegmentTensor st;
      const std::string stored = t->ggml_type >= 0 ? t->ggml_type_name : st_dtype_name(t->dtype);
      if (!compute_dtype(*t, &st.dtype)) {
        throw ModelFormatError(where + ": tensor \"" + spec.name + "\" has dtype " + stored +
                               (gguf ? "; DiT weights must be f32, f16, bf16, q8_0 or q4_0"
                                     : "; DiT weights must be F32, F16, BF16, Q8_0 or Q4_0"));
      }
      if (dtype_is_quantized(st.dtype) && t->shape.size() != 2) {
        throw ModelFormatError(where + ": tensor \"" + spec.name + "\" is " + stored +
                               "; only 2-D weights may be quantized");
      }
      st.name = spec.name;
      st.shape = t->shape;
      st.file_offset = t->begin;
      st.nbytes = t->nbytes();
      st.packed_offset = place(end, st);
      end = st.packed_offset + st.nbytes;
      seg.param_bytes += st.nbytes;
      used.insert(spec.name);
      seg.tensors.push_back(std::move(st));
    }
    seg.packed_bytes = align_up(end, kPackAlignment);
    segments_.push_back(std::move(seg));
  };
  bind("prelude", SegmentKind::kPrelude, prelude_specs(dims_));
  // Binding stops at the first missing tensor, so a block count far beyond what the file holds
  // fails after a few blocks rather than looping over the declared count.
  for (int64_t i = 0; i < dims_.blocks; i++) {
    bind("blocks." + std::to_string(i), SegmentKind::kBlock, block_specs(dims_, i));
  }
  bind("final", SegmentKind::kFinal, final_specs(dims_));

  if (used.size() != f.tensors().size()) {
    std::string extra;
    size_t count = 0;
    for (const auto& t : f.tensors()) {
      if (used.count(t.name)) continue;
      if (count < 5) extra += (count ? ", \"" : "\"") + t.name + "\"";
      count++;
    }
    throw ModelFormatError(where + ": unexpected tensor" + (count > 1 ? "s " : " ") + extra +
                           (count > 5 ? ", …" : ""));
  }
}

DitModel::~DitModel() = default;

DitModel::HostParams DitModel::prepare_params(size_t index) { return cache_->prepare(index); }
void DitModel::release_params(size_t index) { cache_->release(index); }
void DitModel::release_params(size_t index, Backend backend) { cache_->release(index, backend); }
void DitModel::prefetch(const std::vector<size_t>& order, bool cyclic) {
  cache_->prefetch(order, cyclic);
}
void DitModel::load_all() { cache_->load_all(); }
void DitModel::cancel_prefetch() { cache_->cancel_prefetch(); }
bool DitModel::params_cached(size_t index) const { return cache_->cached(index); }
uint64_t DitModel::host_cache_bytes() const { return cache_->host_bytes(); }
LoadStats DitModel::load_stats() const { return cache_->stats(); }
void DitModel::set_params_backend(Backend backend) { cache_->set_backend(backend); }
DitModel::Backend DitModel::params_backend() const { return cache_->backend(); }
void DitModel::set_read_ahead(size_t segments) { cache_->set_read_ahead(segments); }
void DitModel::set_host_allocator(std::shared_ptr<HostAllocator> allocator) {
  cache_->set_allocator(std::move(allocator));
}
void DitModel::set_verify(bool on) { cache_->set_checksums(on); }
bool DitModel::verify() const { return cache_->checksums(); }
uint64_t DitModel::params_checksum(size_t index) const { return cache_->checksum(index); }
void DitModel::verify_params(size_t index, const uint8_t* data) const {
  cache_->verify(index, data);
}

DitDims job_dims(const ModelDims& model, int64_t batch, int64_t tokens) {
  DitDims d;
  d.hidden = model.hidden;
  d.heads = model.heads;
  d.channels = model.channels;
  d.batch = batch;
  d.tokens = tokens;
  return d;
}

size_t segment_scratch_bytes(SegmentKind kind, const DitDims& dims) {
  switch (kind) {
    case SegmentKind::kPrelude:
      return kernels::prelude_scratch_bytes(dims);
    case SegmentKind::kBlock:
      return kernels::block_scratch_bytes(dims);
    case SegmentKind::kFinal:
      return kernels::final_scratch_bytes(dims);
  }
  return 0;
}

}  // namespace ferry
