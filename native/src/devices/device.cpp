#include "ferry/device.h"

#include "ferry/errors.h"

namespace ferry {

const char* device_kind_name(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCpu:
      return "cpu";
    case DeviceKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    device_ = other.device_;
    data_ = other.data_;
    size_ = other.size_;
    other.device_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() noexcept {
  if (device_ && data_) device_->free_raw(data_);
  device_ = nullptr;
  data_ = nullptr;
  size_ = 0;
}

DeviceLease::DeviceLease(Device& device) {
  if (!device.try_begin_job()) {
    throw DeviceBusyError(device.name() +
                          ": the device is already running a job (it runs one at a time)");
  }
  device_ = &device;
}

DeviceLease& DeviceLease::operator=(DeviceLease&& other) noexcept {
  if (this != &other) {
    reset();
    device_ = other.device_;
    other.device_ = nullptr;
  }
  return *this;
}

Device& DeviceLease::device() const {
  if (!device_) throw InvalidArgumentError("DeviceLease: no device held");
  return *device_;
}

void DeviceLease::reset() noexcept {
  if (device_) device_->end_job();
  device_ = nullptr;
}

}  // namespace ferry
