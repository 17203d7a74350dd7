// libFuzzer target: Ferry's safetensors reader. The input is a whole file: the 8-byte header
// length, the JSON header (parse_safetensors_header: Ferry's JSON parser, dtypes, shapes, offsets
// against the file size), then the data — opened, bound as a model and read back
// (fuzz_common.h). Inputs that sniff as GGUF belong to fuzz_gguf and are left out of the corpus.
#include <cstring>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size >= 4 && std::memcmp(data, "GGUF", 4) == 0) return -1;
  ferry_fuzz::open_and_read(data, size);
  return 0;
}
