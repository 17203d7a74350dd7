// Fuzzing the model readers: seeded mutations of valid files — a Ferry DiT in safetensors, the
// same DiT in GGUF (q8_0, so quantized tensor infos too), and the real tiny Llama GGUF (ggml's
// reader behind Ferry's) — truncations, flipped bytes, rewritten length, count and type fields.
// Every case must end in a valid open or a ferry::Error (ModelFormatError, IoError, …): never a
// crash, an abort (a GGML_ASSERT), a hang, another exception type, or an allocation sized by a
// corrupt field. Should one crash, the handler below prints the case (file, seed, case number and
// mutation) so it can be replayed.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
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

// The case under way, for the crash handler (async-signal-safe: a fixed buffer and write(2)).
char g_case[256] = "";

extern "C" void on_crash(int sig) {
  const char head[] = "\nfuzz: crashed (signal) in case: ";
  (void)!write(2, head, sizeof head - 1);
  (void)!write(2, g_case, strnlen(g_case, sizeof g_case));
  (void)!write(2, "\n", 1);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// One mutation of `bytes`, chosen by the generator; `what` describes it.
std::string mutate(const std::string& bytes, std::mt19937_64& rng, size_t header_span, char* what,
                   size_t what_size) {
  std::string b = bytes;
  const size_t span = std::min(header_span, b.size());
  switch (rng() % 4) {
    case 0: {  // truncate anywhere
      const size_t cut = rng() % b.size();
      b.resize(cut);
      std::snprintf(what, what_size, "truncated to %zu bytes", cut);
      break;
    }
    case 1: {  // flip a few bytes, mostly in the header where the structure is
      const int flips = 1 + static_cast<int>(rng() % 4);
      int n = std::snprintf(what, what_size, "xor");
      for (int i = 0; i < flips; i++) {
        const size_t at = rng() % span;
        const auto x = static_cast<char>(1 + rng() % 255);
        b[at] ^= x;
        if (n > 0 && size_t(n) < what_size) {
          n += std::snprintf(what + n, what_size - n, " [%zu]^=0x%02x", at, unsigned(uint8_t(x)));
        }
      }
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
      std::snprintf(what, what_size, "u64 at %zu = 0x%016llx", at,
                    static_cast<unsigned long long>(v));
      break;
    }
    default: {  // overwrite a 4-byte field (types, dims, versions)
      const uint32_t v = static_cast<uint32_t>(rng() % 3 == 0 ? rng() : rng() % 64);
      const size_t at = rng() % span;
      if (at + 4 <= b.size()) std::memcpy(&b[at], &v, 4);
      std::snprintf(what, what_size, "u32 at %zu = 0x%08x", at, v);
      break;
    }
  }
  return b;
}

struct Counts {
  int valid = 0;
  int refused = 0;
};

void describe_case(const std::string& name, uint64_t seed, int i, const char* what) {
  std::snprintf(g_case, sizeof g_case, "%s seed %llu case %d: %s", name.c_str(),
                static_cast<unsigned long long>(seed), i, what);
}

// Mutated files opened through the model path: ModelFile::open, then Model::open (binding as a
// DiT) and reading every segment.
void fuzz_files(const std::string& name, const std::string& bytes, size_t header_span, int cases,
                uint64_t seed, Counts& counts) {
  TempDir dir;
  const std::string path = dir.file(name);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < cases; i++) {
    char what[160];
    const std::string b = mutate(bytes, rng, header_span, what, sizeof what);
    describe_case(name, seed, i, what);
    write_file(path, b);
    try {
      auto file = ModelFile::open(path);
      // A header that parses must also bind as a DiT or say why, and read back in bounds.
      try {
        auto model = Model::open(path);
        for (size_t s = 0; s < model->base_segments().size(); s++) model->prepare_params(s);
      } catch (const Error&) {
      }
      counts.valid++;
    } catch (const Error&) {
      counts.refused++;
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string(g_case) + ": " + e.what());
    }
  }
}

// Mutated bytes parsed from memory (the same parser the file path uses), so a large file's
// thousands of cases do not write gigabytes.
void fuzz_memory(const std::string& name, const std::string& bytes, size_t header_span, int cases,
                 uint64_t seed, Counts& counts) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < cases; i++) {
    char what[160];
    const std::string b = mutate(bytes, rng, header_span, what, sizeof what);
    describe_case(name, seed, i, what);
    try {
      parse_gguf_header(name, b.size(), [&b](uint64_t offset, void* dst, size_t n) {
        if (offset > b.size() || n > b.size() - offset) throw ModelFormatError("read past end");
        std::memcpy(dst, b.data() + offset, n);
      });
      counts.valid++;
    } catch (const Error&) {
      counts.refused++;
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string(g_case) + ": " + e.what());
    }
  }
}

// Cases per file, times FERRY_FUZZ_SCALE (default 1; set it higher to fuzz longer by hand).
int cases(int n) {
  const char* scale = std::getenv("FERRY_FUZZ_SCALE");
  const int k = scale ? std::atoi(scale) : 1;
  return n * (k > 0 ? k : 1);
}

void mutated_files_never_crash() {
  std::signal(SIGABRT, on_crash);
  std::signal(SIGSEGV, on_crash);
  std::signal(SIGBUS, on_crash);
  std::signal(SIGFPE, on_crash);
  // Thousands of small files: on tmpfs when there is one (a VM disk takes milliseconds a write).
  if (access("/dev/shm", W_OK) == 0) setenv("TMPDIR", "/dev/shm", 1);
  auto t0 = std::chrono::steady_clock::now();
  auto lap = [&t0] {
    const auto t = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t - t0).count();
    t0 = t;
    return s;
  };
  TempDir dir;

  Counts st_counts;
  const std::string dit = dir.file("dit.safetensors");
  write_dit(dit, DitSpec{});
  const std::string st = slurp(dit);
  uint64_t header = 0;
  std::memcpy(&header, st.data(), 8);
  fuzz_files("dit.safetensors", st, 8 + header, cases(3000), 1, st_counts);
  const double st_s = lap();

  Counts gg_counts;
  const std::string gg = dit_gguf_bytes(DitSpec{}, "q8_0");
  // Its header (metadata, tensor infos) ends where the data starts.
  const size_t gg_header =
      parse_gguf_header("dit.gguf", gg.size(), [&gg](uint64_t o, void* d, size_t n) {
        std::memcpy(d, gg.data() + o, n);
      }).data_start;
  fuzz_files("dit.gguf", gg, gg_header, cases(3000), 3, gg_counts);
  const double gg_s = lap();

  Counts llama_counts;
  const std::string llama = std::string(FERRY_FIXTURES_DIR) + "/gguf/llama-2-tiny-random.gguf";
  if (access(llama.c_str(), R_OK) == 0) {
    // Its header (metadata with 32,000-entry arrays, tensor infos) ends near 724 KB; each parse
    // reads all of it (milliseconds), hence fewer cases.
    fuzz_memory("llama.gguf", slurp(llama), 724416, cases(600), 2, llama_counts);
  } else {
    std::fprintf(stderr, "skipping Llama GGUF fuzzing: %s not found\n", llama.c_str());
  }
  std::signal(SIGABRT, SIG_DFL);
  std::signal(SIGSEGV, SIG_DFL);
  std::signal(SIGBUS, SIG_DFL);
  std::signal(SIGFPE, SIG_DFL);
  const double llama_s = lap();
  std::fprintf(stderr,
               "opened / refused with a ferry::Error: dit.safetensors %d / %d (%.1f s), dit.gguf "
               "%d / %d (%.1f s), llama.gguf %d / %d (%.1f s)\n",
               st_counts.valid, st_counts.refused, st_s, gg_counts.valid, gg_counts.refused, gg_s,
               llama_counts.valid, llama_counts.refused, llama_s);
  CHECK(st_counts.refused > 0 && st_counts.valid > 0);
  CHECK(gg_counts.refused > 0 && gg_counts.valid > 0);
}

}  // namespace

int main() { return run_all({{"mutated_files_never_crash", mutated_files_never_crash}}); }
