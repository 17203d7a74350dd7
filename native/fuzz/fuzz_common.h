#pragma once
// What both libFuzzer targets do with an input that parses: the bytes as a file (an in-memory
// memfd, opened by path as the executor opens models), bound as a model and every base segment
// read back — so binding, the packed layout and the readers run on every header the parser takes.
// Any ferry::Error is a refusal, which is fine; anything else escapes and libFuzzer reports it,
// as do the sanitizers' findings.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "ferry/errors.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"

namespace ferry_fuzz {

// An anonymous in-memory file holding `data`, closed on destruction.
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t size) {
    fd_ = memfd_create("ferry-fuzz", MFD_CLOEXEC);
    if (fd_ < 0) __builtin_trap();
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd_, data + done, size - done);
      if (n <= 0) __builtin_trap();
      done += static_cast<size_t>(n);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// Opens `data` as a model file, binds it and reads every base segment; refusals are fine.
inline void open_and_read(const uint8_t* data, size_t size) {
  MemFile file(data, size);
  try {
    auto header = ferry::ModelFile::open(file.path());
    (void)header->tensors().size();
  } catch (const ferry::Error&) {
    return;
  }
  try {
    auto model = ferry::Model::open(file.path());
    for (size_t s = 0; s < model->base_segments().size(); s++) {
      model->prepare_params(s);
      model->release_params(s);
    }
  } catch (const ferry::Error&) {
  }
}

}  // namespace ferry_fuzz
