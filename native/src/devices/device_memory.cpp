// A ggml buffer type over Ferry's arena (device_memory.h). A buffer of this type is a piece of the
// device's memory buffer; every tensor operation is forwarded to that buffer's own interface (the
// CPU's memcpy, CUDA's cudaMemcpy on the right device), which work on tensor->data alone.
//
// This needs ggml's internal buffer interface (ggml-backend-impl.h): ggml has no public way to
// give ggml_gallocr memory the caller already owns.
#include "device_memory.h"

#include <cstring>
#include <new>
#include <string>

#include "ferry/device.h"
#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ggml-backend-impl.h"

namespace ferry {

namespace {

struct ScratchType {
  Device* device;
  std::string name;
};

struct ScratchBuffer {
  DeviceBuffer piece;
};

Device& device_of(ggml_backend_buffer_type_t buft) {
  return *static_cast<ScratchType*>(buft->context)->device;
}

ggml_backend_buffer_t memory_of(ggml_backend_buffer_t buffer) {
  return device_of(buffer->buft).memory();
}

void scratch_free(ggml_backend_buffer_t buffer) {
  delete static_cast<ScratchBuffer*>(buffer->context);
}

void* scratch_base(ggml_backend_buffer_t buffer) {
  return static_cast<ScratchBuffer*>(buffer->context)->piece.data();
}

enum ggml_status scratch_init_tensor(ggml_backend_buffer_t buffer, ggml_tensor* tensor) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  if (memory->iface.init_tensor) return memory->iface.init_tensor(memory, tensor);
  return GGML_STATUS_SUCCESS;
}

void scratch_memset_tensor(ggml_backend_buffer_t buffer, ggml_tensor* tensor, uint8_t value,
                           size_t offset, size_t size) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  memory->iface.memset_tensor(memory, tensor, value, offset, size);
}

void scratch_set_tensor(ggml_backend_buffer_t buffer, ggml_tensor* tensor, const void* data,
                        size_t offset, size_t size) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  memory->iface.set_tensor(memory, tensor, data, offset, size);
}

void scratch_get_tensor(ggml_backend_buffer_t buffer, const ggml_tensor* tensor, void* data,
                        size_t offset, size_t size) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  memory->iface.get_tensor(memory, tensor, data, offset, size);
}

bool scratch_cpy_tensor(ggml_backend_buffer_t buffer, const ggml_tensor* src, ggml_tensor* dst) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  return memory->iface.cpy_tensor ? memory->iface.cpy_tensor(memory, src, dst) : false;
}

void scratch_clear(ggml_backend_buffer_t buffer, uint8_t value) {
  ggml_backend_buffer_t memory = memory_of(buffer);
  ggml_tensor span = byte_span(memory, scratch_base(buffer), buffer->size);
  memory->iface.memset_tensor(memory, &span, value, 0, buffer->size);
}

const ggml_backend_buffer_i kScratchBufferInterface = {
    /* .free_buffer   = */ scratch_free,
    /* .get_base      = */ scratch_base,
    /* .init_tensor   = */ scratch_init_tensor,
    /* .memset_tensor = */ scratch_memset_tensor,
    /* .set_tensor    = */ scratch_set_tensor,
    /* .get_tensor    = */ scratch_get_tensor,
    /* .set_tensor_2d = */ nullptr,
    /* .get_tensor_2d = */ nullptr,
    /* .cpy_tensor    = */ scratch_cpy_tensor,
    /* .clear         = */ scratch_clear,
    /* .reset         = */ nullptr,
};

const char* scratch_type_name(ggml_backend_buffer_type_t buft) {
  return static_cast<ScratchType*>(buft->context)->name.c_str();
}

ggml_backend_buffer_t scratch_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
  // ggml expects null on failure (gallocr then reports it); the arena's message is logged so
  // the caller's error can say what did not fit.
  try {
    auto* ctx = new ScratchBuffer{device_of(buft).alloc(size)};
    return ggml_backend_buffer_init(buft, kScratchBufferInterface, ctx, size);
  } catch (const std::exception& e) {
    ggml_log_to_ferry(GGML_LOG_LEVEL_ERROR, e.what(), nullptr);
    return nullptr;
  }
}

size_t scratch_alignment(ggml_backend_buffer_type_t buft) {
  return device_of(buft).tensor_alignment();
}

size_t scratch_max_size(ggml_backend_buffer_type_t buft) { return device_of(buft).total_bytes(); }

size_t scratch_alloc_size(ggml_backend_buffer_type_t buft, const ggml_tensor* tensor) {
  return device_of(buft).tensor_alloc_size(tensor);
}

bool scratch_is_host(ggml_backend_buffer_type_t buft) {
  return ggml_backend_buffer_is_host(device_of(buft).memory());
}

const ggml_backend_buffer_type_i kScratchTypeInterface = {
    /* .get_name       = */ scratch_type_name,
    /* .alloc_buffer   = */ scratch_alloc_buffer,
    /* .get_alignment  = */ scratch_alignment,
    /* .get_max_size   = */ scratch_max_size,
    /* .get_alloc_size = */ scratch_alloc_size,
    /* .is_host        = */ scratch_is_host,
};

}  // namespace

ggml_backend_buffer_type_t create_scratch_buffer_type(Device* device) {
  auto* ctx = new ScratchType{device, "Ferry(" + device->backend_name() + ")"};
  auto* buft = new ggml_backend_buffer_type;
  buft->iface = kScratchTypeInterface;
  buft->device = ggml_backend_get_device(device->backend());
  buft->context = ctx;
  return buft;
}

void destroy_scratch_buffer_type(ggml_backend_buffer_type_t buft) noexcept {
  delete static_cast<ScratchType*>(buft->context);
  delete buft;
}

}  // namespace ferry
