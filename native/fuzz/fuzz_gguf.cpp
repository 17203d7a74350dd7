// libFuzzer target: the GGUF reader (ggml's gguf_init_from_callback behind Ferry's typed
// GgufHeader and its safetensors view). The input is a whole file, parsed from memory first
// (parse_gguf_header), and when it parses, opened as a file, bound as a model and read back
// (fuzz_common.h). Inputs that do not start with the magic are left out of the corpus: they stop
// at the first four bytes.
#include <cstring>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0) return -1;
  try {
    ferry::parse_gguf_header("fuzz.gguf", size, [data, size](uint64_t offset, void* dst, size_t n) {
      if (offset > size || n > size - offset) throw ferry::ModelFormatError("read past the end");
      std::memcpy(dst, data + offset, n);
    });
  } catch (const ferry::Error&) {
    return 0;
  }
  ferry_fuzz::open_and_read(data, size);
  return 0;
}
