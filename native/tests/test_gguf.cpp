// The GGUF reader: the real tiny Llama GGUF from the fixtures (another project's file), and bad
// input — truncations and rewritten fields — each a ModelFormatError, never a crash.
#include <unistd.h>

#include <fstream>
#include <iterator>

#include "ferry/errors.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

const std::string kLlama = std::string(FERRY_FIXTURES_DIR) + "/gguf/llama-2-tiny-random.gguf";

bool fixture_present() {
  if (access(kLlama.c_str(), R_OK) == 0) return true;
  std::printf("skipped: %s not found\n", kLlama.c_str());
  return false;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void real_llama_header() {
  if (!fixture_present()) return;
  auto file = SafetensorsFile::open(kLlama);
  CHECK_EQ(file->tensors().size(), size_t{12});
  const TensorInfo* embd = file->find("token_embd.weight");
  CHECK(embd != nullptr);
  if (!embd) return;
  CHECK_EQ(embd->ggml_type_name, std::string("F16"));
  CHECK(embd->shape == (std::vector<int64_t>{32000, 8}));  // ne [8, 32000], reversed
  CHECK_EQ(embd->nbytes(), uint64_t{32000 * 8 * 2});
  const TensorInfo* down = file->find("blk.0.ffn_down.weight");
  CHECK(down != nullptr && down->shape == (std::vector<int64_t>{8, 32}));
  const TensorInfo* norm = file->find("output_norm.weight");
  CHECK(norm != nullptr && norm->ggml_type_name == "F32" && norm->nbytes() == 32);
  // The last tensor ends exactly at the end of the file.
  CHECK_EQ(file->tensors().back().end, file->file_bytes());
  CHECK_EQ(file->metadata().at("ferry.arch"), std::string("llama"));
  // A real model, but not a Ferry DiT: the binding says so.
  CHECK_THROWS(ModelFormatError, DitModel::open(kLlama), "unsupported architecture");
}

void truncations_are_clean_errors() {
  if (!fixture_present()) return;
  const std::string bytes = slurp(kLlama);
  TempDir dir;
  const std::string path = dir.file("cut.gguf");
  // Cut inside the header (metadata, the tokenizer arrays, tensor infos) and inside the data.
  for (size_t cut : {size_t{3}, size_t{10}, size_t{30}, size_t{5000}, size_t{700000},
                     size_t{724000}, bytes.size() - 1}) {
    write_file(path, bytes.substr(0, cut));
    CHECK_THROWS(ModelFormatError, SafetensorsFile::open(path), "cut.gguf");
  }
}

void rewritten_fields_are_clean_errors() {
  if (!fixture_present()) return;
  const std::string bytes = slurp(kLlama);
  TempDir dir;
  const std::string path = dir.file("bad.gguf");
  auto with = [&](size_t offset, const std::string& patch) {
    std::string b = bytes;
    b.replace(offset, patch.size(), patch);
    write_file(path, b);
  };
  with(4, std::string("\x01\x00\x00\x00", 4));  // version 1
  CHECK_THROWS(ModelFormatError, SafetensorsFile::open(path), "version 1");
  with(8, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8));  // absurd tensor count
  CHECK_THROWS(ModelFormatError, SafetensorsFile::open(path), "tensors");
  with(16, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8));  // absurd metadata count
  CHECK_THROWS(ModelFormatError, SafetensorsFile::open(path), "metadata");
  with(24, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8));  // first key's length
  CHECK_THROWS(ModelFormatError, SafetensorsFile::open(path), "metadata key");
}

}  // namespace

int main() {
  return run_all({
      {"real_llama_header", real_llama_header},
      {"truncations_are_clean_errors", truncations_are_clean_errors},
      {"rewritten_fields_are_clean_errors", rewritten_fields_are_clean_errors},
  });
}
