#pragma once
// The ggml buffer type behind Device::scratch_buffer_type(): its buffers are pieces of a device's
// arena inside the device's one memory buffer, so ggml_gallocr's compute buffers count against
// the budget like everything else on the device.
#include "ggml-backend.h"

namespace ferry {

class Device;

ggml_backend_buffer_type_t create_scratch_buffer_type(Device* device);
void destroy_scratch_buffer_type(ggml_backend_buffer_type_t buft) noexcept;

}  // namespace ferry
