#include "ferry/ggml_support.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "ggml-cpu.h"

namespace ferry {

namespace {

thread_local GgmlLogCapture* t_capture = nullptr;
bool g_verbose = false;

}  // namespace

void ggml_log_to_ferry(enum ggml_log_level level, const char* text, void*) {
  if (text == nullptr) return;
  const bool important = level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN;
  if (t_capture && important) {
    std::string line(text);
    while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
    if (!line.empty()) {
      if (!t_capture->text_.empty()) t_capture->text_ += "; ";
      t_capture->text_ += line;
    }
    return;
  }
  if (important || g_verbose) std::fputs(text, stderr);
}

void ggml_setup() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* verbose = std::getenv("FERRY_GGML_LOG");
    g_verbose = verbose != nullptr && std::strcmp(verbose, "1") == 0;
    ggml_log_set(ggml_log_to_ferry, nullptr);
    ggml_cpu_init();
  });
}

GgmlLogCapture::GgmlLogCapture() : previous_(t_capture) {
  ggml_setup();
  t_capture = this;
}

GgmlLogCapture::~GgmlLogCapture() { t_capture = previous_; }

std::string GgmlLogCapture::text() const { return text_; }

ggml_tensor byte_span(ggml_backend_buffer_t buffer, void* addr, size_t bytes) {
  ggml_tensor t;
  std::memset(&t, 0, sizeof t);
  t.type = GGML_TYPE_I8;
  t.buffer = buffer;
  t.data = addr;
  t.ne[0] = static_cast<int64_t>(bytes);
  t.ne[1] = t.ne[2] = t.ne[3] = 1;
  t.nb[0] = 1;
  t.nb[1] = t.nb[2] = t.nb[3] = bytes;
  std::snprintf(t.name, sizeof t.name, "ferry.span");
  return t;
}

bool ggml_type_from_name(const std::string& name, ggml_type* out) {
  for (int i = 0; i < GGML_TYPE_COUNT; i++) {
    const auto type = static_cast<ggml_type>(i);
    if (ggml_blck_size(type) == 0) continue;  // a removed type's slot
    if (name == ggml_type_name(type)) {
      *out = type;
      return true;
    }
  }
  return false;
}

bool ggml_type_is_weight_type(ggml_type type) {
  if (static_cast<int>(type) < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(type) == 0) {
    return false;
  }
  ggml_setup();
  const auto* cpu = ggml_get_type_traits_cpu(type);
  const auto* traits = ggml_get_type_traits(type);
  // f32 needs no conversion; every other type must convert to f32 (for ops other than matmul).
  return cpu != nullptr && cpu->vec_dot != nullptr &&
         (type == GGML_TYPE_F32 || traits->to_float != nullptr);
}

std::string shape_text(const int64_t* dims, int n) {
  std::string s = "[";
  for (int i = 0; i < n; i++) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

double graph_flops(const ggml_cgraph* graph) {
  double flops = 0;
  auto* g = const_cast<ggml_cgraph*>(graph);
  for (int i = 0; i < ggml_graph_n_nodes(g); i++) {
    const ggml_tensor* node = ggml_graph_node(g, i);
    switch (node->op) {
      case GGML_OP_NONE:
      case GGML_OP_VIEW:
      case GGML_OP_RESHAPE:
      case GGML_OP_PERMUTE:
      case GGML_OP_TRANSPOSE:
        break;  // no arithmetic
      case GGML_OP_MUL_MAT: {
        // dst[n, m, …] = Σ_k src0[k, n]·src1[k, m]: a multiply and an add per term.
        const ggml_tensor* a = node->src[0];
        flops += 2.0 * static_cast<double>(a->ne[0]) * static_cast<double>(ggml_nelements(node));
        break;
      }
      case GGML_OP_FLASH_ATTN_EXT: {
        // q[d, Lq, H, B], k[d, Lk, H, B]: QKᵀ and PV, 2·d·Lq·Lk each per head.
        const ggml_tensor* q = node->src[0];
        const ggml_tensor* k = node->src[1];
        flops += 4.0 * static_cast<double>(q->ne[0]) * static_cast<double>(q->ne[1]) *
                 static_cast<double>(k->ne[1]) * static_cast<double>(q->ne[2]) *
                 static_cast<double>(q->ne[3]);
        break;
      }
      default:
        flops += static_cast<double>(ggml_nelements(node));
        break;
    }
  }
  return flops;
}

}  // namespace ferry
