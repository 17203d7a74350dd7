#include "ferry/errors.h"

#include <cerrno>
#include <cstring>

namespace ferry {
namespace {

std::string io_message(int error_number, const std::string& syscall, const std::string& path) {
  return syscall + " " + path + ": " + std::strerror(error_number);
}

}  // namespace

IoError::IoError(int error_number, std::string syscall, std::string path)
    : Error(io_message(error_number, syscall, path)),
      errno_(error_number),
      syscall_(std::move(syscall)),
      path_(std::move(path)) {}

const char* IoError::code() const noexcept {
  // The codes callers act on (Node's fs errors use the same names); the rest are rare for files.
  switch (errno_) {
    case ENOENT:
      return "ENOENT";
    case EACCES:
      return "EACCES";
    case EPERM:
      return "EPERM";
    case EISDIR:
      return "EISDIR";
    case ENOTDIR:
      return "ENOTDIR";
    case ELOOP:
      return "ELOOP";
    case ENAMETOOLONG:
      return "ENAMETOOLONG";
    case EMFILE:
      return "EMFILE";
    case ENFILE:
      return "ENFILE";
    case EIO:
      return "EIO";
    case ENOMEM:
      return "ENOMEM";
    case EINVAL:
      return "EINVAL";
    case EFBIG:
      return "EFBIG";
    case EOVERFLOW:
      return "EOVERFLOW";
    case ENXIO:
      return "ENXIO";
    case ENODEV:
      return "ENODEV";
    default:
      return "EUNKNOWN";
  }
}

}  // namespace ferry
