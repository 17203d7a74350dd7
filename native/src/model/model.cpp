// Binding a model file to its architecture's segments (both formats), the packed layout, and the
// model's face of its params cache.
#include "ferry/model.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_set>

#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ggml-cpu.h"

namespace ferry {

namespace {

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

// The ggml type a tensor is stored as: GGUF files name one; safetensors files name a dtype, of
// which F32, F16 and BF16 are ggml types too.
bool stored_type(const TensorInfo& t, ggml_type* out) {
  if (t.ggml_type >= 0) {
    *out = static_cast<ggml_type>(t.ggml_type);
    return true;
  }
  switch (t.dtype) {
    case StDType::kF32:
      *out = GGML_TYPE_F32;
      return true;
    case StDType::kF16:
      *out = GGML_TYPE_F16;
      return true;
    case StDType::kBF16:
      *out = GGML_TYPE_BF16;
      return true;
    default:
      return false;
  }
}

std::string stored_type_name(const TensorInfo& t) {
  return t.ggml_type >= 0 ? t.ggml_type_name : st_dtype_name(t.dtype);
}

// "[3072, 64]" — row-major, as PyTorch and safetensors headers show shapes.
std::string row_major_text(const int64_t* ne, int n_dims) {
  std::vector<int64_t> shape(ne, ne + n_dims);
  std::reverse(shape.begin(), shape.end());
  return shape_text(shape.data(), static_cast<int>(shape.size()));
}

}  // namespace

ggml_tensor tensor_descriptor(const SegmentTensor& t) {
  ggml_tensor d;
  std::memset(&d, 0, sizeof d);
  d.type = t.type;
  for (int i = 0; i < GGML_MAX_DIMS; i++) d.ne[i] = t.ne[i];
  d.nb[0] = ggml_type_size(t.type);
  d.nb[1] = d.nb[0] * (d.ne[0] / ggml_blck_size(t.type));
  for (int i = 2; i < GGML_MAX_DIMS; i++) d.nb[i] = d.nb[i - 1] * d.ne[i - 1];
  return d;
}

std::shared_ptr<Model> Model::open(const std::string& path) {
  return std::make_shared<Model>(ModelFile::open(path));
}

std::shared_ptr<Model> Model::open(const std::string& path, const Options& options) {
  auto model = std::make_shared<Model>(ModelFile::open(path), options.loader, options.layout);
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

Model::Model(std::unique_ptr<ModelFile> file, const LoaderOptions& loader,
             ggml_backend_buffer_type_t layout)
    : file_(std::move(file)) {
  ggml_setup();
  arch_ = arch_for_file(*file_);
  if (!layout) layout = ggml_backend_cpu_buffer_type();
  layout_name_ = ggml_backend_buft_name(layout);
  bind_segments(layout);
  std::vector<ParamsSegmentLayout> layouts;
  layouts.reserve(segments_.size());
  for (const auto& seg : segments_) {
    ParamsSegmentLayout l;
    l.name = seg.name;
    l.buffer_bytes = seg.packed_bytes;
    for (const auto& t : seg.tensors)
      l.pieces.push_back({t.file_offset, t.packed_offset, t.nbytes});
    layouts.push_back(std::move(l));
  }
  cache_ = std::make_unique<ParamsCache>(*file_, std::move(layouts), loader);
}

void Model::bind_segments(ggml_backend_buffer_type_t layout) {
  const ModelFile& f = *file_;
  const bool gguf = f.format() == ModelFormat::kGguf;
  const std::string where = f.path() + " (" + arch_->describe() + ")";
  std::unordered_set<std::string> used;
  for (const SegmentSpec& spec : arch_->segments()) {
    BaseSegment seg;
    seg.name = spec.name;
    seg.kind = spec.kind;
    uint64_t end = 0;
    for (const WeightSpec& w : spec.weights) {
      const TensorInfo* t = f.find(w.name);
      if (!t) throw ModelFormatError(where + ": missing tensor \"" + w.name + "\"");
      SegmentTensor st;
      st.name = w.name;
      if (!stored_type(*t, &st.type)) {
        throw ModelFormatError(where + ": tensor \"" + w.name + "\" has dtype " +
                               stored_type_name(*t) + "; weights must be F32, F16 or BF16" +
                               (gguf ? " or a ggml quantized type" : ""));
      }
      const bool vector_type =
          st.type == GGML_TYPE_F32 || st.type == GGML_TYPE_F16 || st.type == GGML_TYPE_BF16;
      if (w.matrix ? !ggml_type_is_weight_type(st.type) : !vector_type) {
        throw ModelFormatError(where + ": tensor \"" + w.name + "\" is " + stored_type_name(*t) +
                               (w.matrix ? ", a type ggml cannot multiply with"
                                         : "; norm weights and biases must be f32, f16 or bf16"));
      }
      // The file's shape in ggml order, against the architecture's.
      const int file_dims = static_cast<int>(t->shape.size());
      bool same = file_dims <= GGML_MAX_DIMS;
      int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
      for (int i = 0; same && i < file_dims; i++) ne[i] = t->shape[file_dims - 1 - i];
      for (int i = 0; same && i < GGML_MAX_DIMS; i++) same = ne[i] == w.ne[i];
      if (!same) {
        throw ModelFormatError(where + ": tensor \"" + w.name + "\" has shape " +
                               shape_text(t->shape.data(), file_dims) + ", expected " +
                               row_major_text(w.ne, w.n_dims));
      }
      st.n_dims = w.n_dims;
      for (int i = 0; i < GGML_MAX_DIMS; i++) st.ne[i] = w.ne[i];
      st.file_offset = t->begin;
      st.nbytes = t->nbytes();
      const ggml_tensor desc = tensor_descriptor(st);
      if (ggml_nbytes(&desc) != st.nbytes) {
        throw ModelFormatError(where + ": tensor \"" + w.name + "\" holds " +
                               std::to_string(st.nbytes) + " bytes, but " + stored_type_name(*t) +
                               " " + shape_text(t->shape.data(), file_dims) + " needs " +
                               std::to_string(ggml_nbytes(&desc)));
      }
      st.span_bytes =
          std::max<uint64_t>(st.nbytes, ggml_backend_buft_get_alloc_size(layout, &desc));
      st.packed_offset = place(end, st);
      end = st.packed_offset + st.span_bytes;
      seg.param_bytes += st.nbytes;
      used.insert(w.name);
      seg.tensors.push_back(std::move(st));
    }
    seg.packed_bytes = align_up(end, kPackAlignment);
    segments_.push_back(std::move(seg));
  }

  size_t owned = 0;
  for (const auto& t : f.tensors()) owned += arch_->owns_tensor(t.name) ? 1 : 0;
  if (used.size() != owned) {
    std::string extra;
    size_t count = 0;
    for (const auto& t : f.tensors()) {
      if (used.count(t.name) || !arch_->owns_tensor(t.name)) continue;
      if (count < 5) extra += (count ? ", \"" : "\"") + t.name + "\"";
      count++;
    }
    throw ModelFormatError(where + ": unexpected tensor" + (count > 1 ? "s " : " ") + extra +
                           (count > 5 ? ", …" : ""));
  }
}

Model::~Model() = default;

Model::HostParams Model::prepare_params(size_t index) { return cache_->prepare(index); }
void Model::release_params(size_t index) { cache_->release(index); }
void Model::release_params(size_t index, Backend backend) { cache_->release(index, backend); }
void Model::prefetch(const std::vector<size_t>& order, bool cyclic) {
  cache_->prefetch(order, cyclic);
}
void Model::load_all() { cache_->load_all(); }
void Model::load(size_t first, size_t last) { cache_->load(first, last); }
void Model::cancel_prefetch() { cache_->cancel_prefetch(); }
bool Model::params_cached(size_t index) const { return cache_->cached(index); }
uint64_t Model::host_cache_bytes() const { return cache_->host_bytes(); }
LoadStats Model::load_stats() const { return cache_->stats(); }
void Model::set_params_backend(Backend backend) { cache_->set_backend(backend); }
Model::Backend Model::params_backend() const { return cache_->backend(); }
void Model::set_read_ahead(size_t segments) { cache_->set_read_ahead(segments); }
void Model::set_host_allocator(std::shared_ptr<HostAllocator> allocator) {
  cache_->set_allocator(std::move(allocator));
}
void Model::set_verify(bool on) { cache_->set_checksums(on); }
bool Model::verify() const { return cache_->checksums(); }
uint64_t Model::params_checksum(size_t index) const { return cache_->checksum(index); }
void Model::verify_params(size_t index, const uint8_t* data) const { cache_->verify(index, data); }

}  // namespace ferry
