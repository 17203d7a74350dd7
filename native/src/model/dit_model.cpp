#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>

#include "ferry/errors.h"
#include "ferry/model.h"

namespace ferry {

namespace {

const char* const kArchKey = "ferry.arch";

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
  if (t.ggml_type >= 0) {
    switch (t.ggml_type) {
      case 0:
        *out = DType::F32;
        return true;
      case 1:
        *out = DType::F16;
        return true;
      case 30:
        *out = DType::BF16;
        return true;
      case 8:
        *out = DType::Q8_0;
        return true;
      case 2:
        *out = DType::Q4_0;
        return true;
      default:
        return false;
    }
  }
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

// A segment's tensors are read in chunks of this size by a few threads at once: one big
// sequential pread stream leaves a fast disk (or the page cache) underused.
constexpr uint64_t kReadChunkBytes = uint64_t{16} << 20;
constexpr unsigned kReadThreads = 4;

struct ReadChunk {
  uint64_t offset;
  uint8_t* dst;
  uint64_t bytes;
};

// Reads every chunk straight into its place; small segments stay on the calling thread.
void read_chunks(const SafetensorsFile& file, const std::vector<ReadChunk>& chunks) {
  const unsigned threads = static_cast<unsigned>(std::min<size_t>(kReadThreads, chunks.size()));
  if (threads <= 1) {
    for (const auto& c : chunks) file.read(c.offset, c.dst, c.bytes);
    return;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mu;
  auto worker = [&] {
    for (size_t i = next++; i < chunks.size(); i = next++) {
      try {
        file.read(chunks[i].offset, chunks[i].dst, chunks[i].bytes);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mu);
        if (!failure) failure = std::current_exception();
        next = chunks.size();
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; t++) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

struct DitModel::CacheEntry {
  std::mutex mu;
  std::atomic<bool> ready{false};
  uint8_t* data = nullptr;
  ~CacheEntry() { std::free(data); }
};

std::shared_ptr<DitModel> DitModel::open(const std::string& path) {
  return std::make_shared<DitModel>(SafetensorsFile::open(path));
}

DitModel::DitModel(std::unique_ptr<SafetensorsFile> file) : file_(std::move(file)) {
  const SafetensorsFile& f = *file_;
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
  const std::string where = f.path() + " (DiT " + std::to_string(dims_.blocks) +
                            " blocks, hidden " + std::to_string(dims_.hidden) + ", heads " +
                            std::to_string(dims_.heads) + ", channels " +
                            std::to_string(dims_.channels) + ")";

  std::unordered_set<std::string> used;
  auto bind = [&](std::string name, SegmentKind kind, const std::vector<TensorSpec>& specs) {
    BaseSegment seg;
    seg.name = std::move(name);
    seg.kind = kind;
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
                               "; DiT weights must be F32, F16, BF16, Q8_0 or Q4_0");
      }
      if (dtype_is_quantized(st.dtype) && t->shape.size() != 2) {
        throw ModelFormatError(where + ": tensor \"" + spec.name + "\" is " + stored +
                               "; only 2-D weights may be quantized");
      }
      st.name = spec.name;
      st.shape = t->shape;
      st.file_offset = t->begin;
      st.nbytes = t->nbytes();
      st.packed_offset = seg.packed_bytes;
      seg.packed_bytes = align_up(seg.packed_bytes + st.nbytes, kPackAlignment);
      seg.param_bytes += st.nbytes;
      used.insert(spec.name);
      seg.tensors.push_back(std::move(st));
    }
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
  for (size_t i = 0; i < segments_.size(); i++) cache_.push_back(std::make_unique<CacheEntry>());
}

DitModel::~DitModel() = default;

bool DitModel::params_cached(size_t index) const {
  return index < cache_.size() && cache_[index]->ready.load(std::memory_order_acquire);
}

DitModel::HostParams DitModel::prepare_params(size_t index) {
  if (index >= segments_.size()) {
    throw InvalidArgumentError(path() + ": base segment " + std::to_string(index) +
                               " out of range (the model has " + std::to_string(segments_.size()) +
                               ")");
  }
  CacheEntry& entry = *cache_[index];
  if (entry.ready.load(std::memory_order_acquire)) return {entry.data, 0};
  // One reader per segment; a second run wanting the same segment waits and then finds it cached.
  std::lock_guard<std::mutex> lock(entry.mu);
  if (entry.ready.load(std::memory_order_acquire)) return {entry.data, 0};
  const BaseSegment& seg = segments_[index];
  const size_t size = seg.packed_bytes == 0 ? kPackAlignment : seg.packed_bytes;
  void* raw = nullptr;
  if (posix_memalign(&raw, kPackAlignment, size) != 0) {
    throw Error(path() + ": could not allocate " + std::to_string(size) +
                " bytes of host memory for the params of " + seg.name);
  }
  auto* data = static_cast<uint8_t*>(raw);
  try {
    uint64_t at = 0;
    std::vector<ReadChunk> chunks;
    for (const auto& t : seg.tensors) {
      // Padding is zeroed so the buffer's bytes (and any checksum of them) are deterministic.
      std::memset(data + at, 0, t.packed_offset - at);
      for (uint64_t done = 0; done < t.nbytes; done += kReadChunkBytes) {
        const uint64_t n = std::min<uint64_t>(kReadChunkBytes, t.nbytes - done);
        chunks.push_back({t.file_offset + done, data + t.packed_offset + done, n});
      }
      at = t.packed_offset + t.nbytes;
    }
    std::memset(data + at, 0, size - at);
    read_chunks(*file_, chunks);
  } catch (...) {
    std::free(data);
    throw;
  }
  entry.data = data;
  host_bytes_.fetch_add(size);
  entry.ready.store(true, std::memory_order_release);
  return {data, seg.param_bytes};
}

void DitModel::release_params(size_t index) {
  if (index >= segments_.size()) return;
  CacheEntry& entry = *cache_[index];
  std::lock_guard<std::mutex> lock(entry.mu);
  if (!entry.ready.load(std::memory_order_acquire)) return;
  entry.ready.store(false, std::memory_order_release);
  std::free(entry.data);
  entry.data = nullptr;
  const BaseSegment& seg = segments_[index];
  host_bytes_.fetch_sub(seg.packed_bytes == 0 ? kPackAlignment : seg.packed_bytes);
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
