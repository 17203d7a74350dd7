#pragma once
// Ferry's side of ggml: one-time set-up (logging), its errors turned into Ferry's, and small
// helpers every part of the native layer shares. Nothing model-specific lives here.
#include <cstdint>
#include <string>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml.h"

namespace ferry {

// Idempotent, thread-safe: routes ggml's log through Ferry (warnings and errors to stderr, the
// rest only with FERRY_GGML_LOG=1; captured per thread while a GgmlLogCapture is alive) and
// initialises ggml's CPU tables.
void ggml_setup();

// ggml's log callback, installed by ggml_setup(); Ferry code reports through it too where ggml
// expects a failure to be logged rather than thrown (a buffer type's allocation).
void ggml_log_to_ferry(enum ggml_log_level level, const char* text, void* user_data);

// While alive, ggml's error and warning messages on this thread are collected instead of
// printed, so a failed ggml call (gguf_init_from_file returning null) can say why.
class GgmlLogCapture {
 public:
  GgmlLogCapture();
  ~GgmlLogCapture();
  GgmlLogCapture(const GgmlLogCapture&) = delete;
  GgmlLogCapture& operator=(const GgmlLogCapture&) = delete;
  // What was logged, one line per message, trimmed; empty if nothing.
  std::string text() const;

 private:
  GgmlLogCapture* previous_;
  std::string text_;
  friend void ggml_log_to_ferry(enum ggml_log_level, const char*, void*);
};

// A 1-D byte tensor over `bytes` at `addr` inside `buffer`, not owned by any context: the unit
// ggml's tensor_set/get(_async) move, for transfers that are not one model tensor.
ggml_tensor byte_span(ggml_backend_buffer_t buffer, void* addr, size_t bytes);

// ggml's type by its name ("f32", "q4_K"), or false.
bool ggml_type_from_name(const std::string& name, ggml_type* out);
// Whether ggml's CPU backend can multiply with weights of this type (it has a vec_dot and a
// dequantizer) — every type a GGUF weight may have, less removed and integer-only ones.
bool ggml_type_is_weight_type(ggml_type type);

// "[4096, 3072]": a shape as text (any order the caller chose).
std::string shape_text(const int64_t* dims, int n);

// The number of floating-point operations in a graph (2·m·n·k per matrix product, one per
// element for the rest): the planner's compute estimate, counted from the graph itself.
double graph_flops(const ggml_cgraph* graph);

}  // namespace ferry
