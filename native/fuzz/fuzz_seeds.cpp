// Writes the fuzz targets' seed corpora: valid files of every kind the readers take, from the
// ctest suite's own writers. Usage: fuzz_seeds SAFETENSORS_DIR GGUF_DIR
#include <cstdio>
#include <string>

#include "test_support.h"

using namespace ferry_test;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SAFETENSORS_DIR GGUF_DIR\n", argv[0]);
    return 2;
  }
  const std::string st = argv[1];
  const std::string gg = argv[2];
  int n = 0;
  // Small models (one or two blocks): the fuzzer's time goes into headers, not into data.
  for (const char* dtype : {"F32", "F16", "BF16"}) {
    DitSpec spec;
    spec.hidden = 16;
    spec.heads = 2;
    spec.channels = 4;
    spec.blocks = 1;
    spec.dtype = dtype;
    write_dit(st + "/dit-" + dtype + ".safetensors", spec);
    n++;
  }
  for (const char* type : {"f32", "f16", "bf16", "q8_0", "q4_0"}) {
    DitSpec spec;
    spec.hidden = 32;
    spec.heads = 2;
    spec.channels = 32;
    spec.blocks = 1;
    write_dit_gguf(gg + "/dit-" + type + ".gguf", spec, type);
    n++;
  }
  DitSpec aligned;
  aligned.hidden = 32;
  aligned.heads = 2;
  aligned.channels = 32;
  aligned.blocks = 2;
  write_dit_gguf(gg + "/dit-align64.gguf", aligned, "f32", 64);
  n++;
  std::fprintf(stderr, "fuzz_seeds: wrote %d seed files\n", n);
  return 0;
}
