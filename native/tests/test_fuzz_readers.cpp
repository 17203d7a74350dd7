// Fuzzing the native readers: 12,000 seeded mutations of valid files (a Ferry DiT in safetensors
// and the real tiny Llama GGUF) — truncations, flipped bytes, rewritten length and count fields.
// Every case must end in a valid open or a ferry::Error (ModelFormatError, IoError, …): never a
// crash, a hang, another exception type, or an allocation sized by a corrupt field.
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

#include "ferry/errors.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// One mutation of `bytes`, chosen by the generator.
std::string mutate(const std::string& bytes, std::mt19937_64& rng, size_t header_span) {
  std::string b = bytes;
  const size_t span = std::min(header_span, b.size());
  switch (rng() % 4) {
    case 0:  // truncate anywhere
      b.resize(rng() % b.size());
      break;
    case 1: {  // flip a few bytes, mostly in the header where the structure is
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int i = 0; i < flips; i++) b[rng() % span] ^= static_cast<char>(1 + rng() % 255);
      break;
    }
    case 2: {  // overwrite an aligned 8-byte field (lengths, counts, offsets) with an extreme
      const uint64_t values[] = {0,
                                 1,
                                 0xFFFFFFFFFFFFFFFFull,
                                 0x7FFFFFFFFFFFFFFFull,
                                 static_cast<uint64_t>(b.size()),
                                 1ull << 40,
                                 rng()};
      const uint64_t v = values[rng() % 7];
      const size_t at = (rng() % std::max<size_t>(1, span / 8)) * 8;
      if (at + 8 <= b.size()) std::memcpy(&b[at], &v, 8);
      break;
    }
    default: {  // overwrite a 4-byte field (types, dims, versions)
      const uint32_t v = static_cast<uint32_t>(rng() % 3 == 0 ? rng() : rng() % 64);
      const size_t at = rng() % span;
      if (at + 4 <= b.size()) std::memcpy(&b[at], &v, 4);
      break;
    }
  }
  return b;
}

struct Counts {
  int valid = 0;
  int refused = 0;
};

void fuzz(const std::string& name, const std::string& bytes, size_t header_span, int cases,
          uint64_t seed, Counts& counts) {
  TempDir dir;
  const std::string path = dir.file(name);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < cases; i++) {
    write_file(path, mutate(bytes, rng, header_span));
    try {
      auto file = SafetensorsFile::open(path);
      // A header that parses must also bind as a DiT or say why, and read back in bounds.
      try {
        auto model = DitModel::open(path);
        for (size_t s = 0; s < model->base_segments().size(); s++) model->prepare_params(s);
      } catch (const Error&) {
      }
      counts.valid++;
    } catch (const Error&) {
      counts.refused++;
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, name + " case " + std::to_string(i) + ": " + e.what());
    }
  }
}

void mutated_files_never_crash() {
  Counts counts;
  TempDir dir;
  const std::string dit = dir.file("dit.safetensors");
  write_dit(dit, DitSpec{});
  const std::string st = slurp(dit);
  uint64_t header = 0;
  std::memcpy(&header, st.data(), 8);
  fuzz("dit.safetensors", st, 8 + header, 6000, 1, counts);

  const std::string llama = std::string(FERRY_FIXTURES_DIR) + "/gguf/llama-2-tiny-random.gguf";
  if (access(llama.c_str(), R_OK) == 0) {
    // The 1.7 MB GGUF is parsed from memory (the same parser the file path uses), so 6,000
    // cases do not write 10 GB. Its header (metadata with 32,000-entry arrays, tensor infos)
    // ends near 724 KB.
    const std::string bytes = slurp(llama);
    std::mt19937_64 rng(2);
    for (int i = 0; i < 6000; i++) {
      const std::string b = mutate(bytes, rng, 724416);
      try {
        parse_gguf_header("llama.gguf", b.size(), [&b](uint64_t offset, void* dst, size_t n) {
          if (offset > b.size() || n > b.size() - offset) throw ModelFormatError("read past end");
          std::memcpy(dst, b.data() + offset, n);
        });
        counts.valid++;
      } catch (const Error&) {
        counts.refused++;
      } catch (const std::exception& e) {
        report_failure(__FILE__, __LINE__,
                       "llama.gguf case " + std::to_string(i) + ": " + e.what());
      }
    }
  } else {
    std::printf("skipped GGUF fuzzing: %s not found\n", llama.c_str());
  }
  std::printf("%d mutated files opened, %d refused with a ferry::Error\n", counts.valid,
              counts.refused);
  CHECK(counts.refused > 0);
}

}  // namespace

int main() { return run_all({{"mutated_files_never_crash", mutated_files_never_crash}}); }
