#pragma once
// Failures the native layer reports. Each class carries a stable name() that the addon copies to
// the JavaScript Error's `.name`, so TypeScript can map it to a typed error (and the scheduler to a
// gRPC status) without parsing messages.
#include <stdexcept>
#include <string>

namespace ferry {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  virtual const char* name() const noexcept { return "Error"; }
};

// An allocation did not fit in device memory (the arena's capacity, the VRAM budget).
class DeviceOutOfMemoryError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "DeviceOutOfMemoryError"; }
};

// A model file is corrupt, truncated, or not the layout it claims to be.
class ModelFormatError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "ModelFormatError"; }
};

// A caller passed something unusable: a bad plan, dims, sizes.
class InvalidArgumentError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "InvalidArgumentError"; }
};

// A run stopped because it was asked to.
class CancelledError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "CancelledError"; }
};

// A device already runs a job; it runs one at a time.
class DeviceBusyError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "DeviceBusyError"; }
};

// A device this machine or build does not have (no GPU, no CUDA support compiled in).
class DeviceUnavailableError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "DeviceUnavailableError"; }
};

// Bytes did not survive a transfer: a device copy's checksum differs from its host source's
// (RunRequest::verify).
class IntegrityError : public Error {
 public:
  using Error::Error;
  const char* name() const noexcept override { return "IntegrityError"; }
};

// A system call failed on a file. Carries errno and its symbolic code ("ENOENT") so callers can
// tell a missing file from a corrupt one, as Node's own fs errors do.
class IoError : public Error {
 public:
  IoError(int error_number, std::string syscall, std::string path);
  const char* name() const noexcept override { return "IoError"; }
  int error_number() const noexcept { return errno_; }
  const char* code() const noexcept;  // "ENOENT", "EACCES", … ("EUNKNOWN" if unlisted)
  const std::string& syscall() const noexcept { return syscall_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int errno_;
  std::string syscall_;
  std::string path_;
};

}  // namespace ferry
