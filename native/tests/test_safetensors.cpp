// The safetensors reader: the real sample files the safetensors project publishes (values checked
// after decoding), and every kind of bad input, each a ModelFormatError naming file and problem.
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>

#include "ferry/errors.h"
#include "ferry/safetensors.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

const std::string kSamples = std::string(FERRY_FIXTURES_DIR) + "/safetensors-samples/";

struct Sample {
  const char* letter;
  StDType dtype;
  std::vector<double> values;
};

// −3…2 in each dtype; unsigned types wrap.
std::vector<Sample> samples() {
  const std::vector<double> s = {-3, -2, -1, 0, 1, 2};
  return {
      {"B", StDType::kU8, {253, 254, 255, 0, 1, 2}},
      {"H", StDType::kU16, {65533, 65534, 65535, 0, 1, 2}},
      {"I", StDType::kU32, {4294967293.0, 4294967294.0, 4294967295.0, 0, 1, 2}},
      {"b", StDType::kI8, s},
      {"h", StDType::kI16, s},
      {"i", StDType::kI32, s},
      {"e", StDType::kF16, s},
      {"f", StDType::kF32, s},
      {"d", StDType::kF64, s},
  };
}

bool fixtures_present() {
  struct stat st;
  if (stat((kSamples + "overall.safetensors").c_str(), &st) == 0) return true;
  std::fprintf(stderr, "skipping fixture tests: %s not found\n", kSamples.c_str());
  return false;
}

void check_sample(const SafetensorsFile& file, const TensorInfo& t, const Sample& s) {
  CHECK_EQ(t.name, std::string(s.letter));
  CHECK(t.dtype == s.dtype);
  CHECK(t.shape == std::vector<int64_t>{6});
  CHECK_EQ(t.elements(), int64_t{6});
  CHECK_EQ(t.nbytes(), uint64_t{6} * st_dtype_bits(s.dtype) / 8);
  const std::vector<uint8_t> bytes = file.read_tensor(t);
  const std::vector<double> values = decode_tensor_f64(t.dtype, bytes.data(), bytes.size());
  CHECK(values == s.values);
}

void fixture_single_files() {
  if (!fixtures_present()) return;
  for (const Sample& s : samples()) {
    auto file = SafetensorsFile::open(kSamples + s.letter + ".safetensors");
    CHECK_EQ(file->tensors().size(), size_t{1});
    CHECK_EQ(file->metadata().size(), size_t{1});
    CHECK_EQ(file->metadata().at("test"), std::string("a"));
    CHECK_EQ(file->header().data_start, 8 + file->header().header_bytes);
    CHECK_EQ(file->tensors()[0].end, file->file_bytes());
    check_sample(*file, file->tensors()[0], s);
  }
}

void fixture_overall() {
  if (!fixtures_present()) return;
  auto file = SafetensorsFile::open(kSamples + "overall.safetensors");
  CHECK_EQ(file->metadata().at("test"), std::string("a"));
  CHECK_EQ(file->tensors().size(), size_t{9});
  for (const Sample& s : samples()) {
    const TensorInfo* t = file->find(s.letter);
    CHECK(t != nullptr);
    if (t) check_sample(*file, *t, s);
  }
  // Data order, each tensor starting where the previous ended.
  for (size_t i = 1; i < file->tensors().size(); i++) {
    CHECK_EQ(file->tensors()[i].begin, file->tensors()[i - 1].end);
  }
  CHECK(file->find("missing") == nullptr);
}

// Writes `bytes` to a temp file and expects open() to fail with `needle` in the message, which
// must also name the file.
void expect_bad(TempDir& dir, const std::string& bytes, const std::string& needle) {
  const std::string path = dir.file("bad.safetensors");
  write_file(path, bytes);
  bool thrown = false;
  try {
    SafetensorsFile::open(path);
  } catch (const ModelFormatError& e) {
    thrown = true;
    const std::string msg = e.what();
    if (msg.find(needle) == std::string::npos || msg.find(path) == std::string::npos) {
      report_failure(__FILE__, __LINE__, "message \"" + msg + "\" lacks \"" + needle + "\"");
    }
  }
  if (!thrown) report_failure(__FILE__, __LINE__, "no ModelFormatError for: " + needle);
}

std::string one_tensor(const std::string& entry, const std::string& data) {
  return safetensors_bytes("{\"t\":" + entry + "}", data);
}

void bad_lengths() {
  TempDir dir;
  expect_bad(dir, "", "too short");
  expect_bad(dir, std::string("\x05\0\0", 3), "too short");
  std::string huge(8, '\0');
  huge[4] = 1;  // 2^32
  expect_bad(dir, huge + "{}", "exceeds the 100000000-byte limit");
  std::string past(8, '\0');
  past[0] = 100;
  expect_bad(dir, past + "{}", "runs past the end of the file");
}

void bad_json() {
  TempDir dir;
  expect_bad(dir, safetensors_bytes("{\"t\":", ""), "not valid JSON");
  expect_bad(dir, safetensors_bytes("{\"t\" 1}", ""), "expected ':'");
  expect_bad(dir, safetensors_bytes("{} x", ""), "unexpected data after");
  expect_bad(dir, safetensors_bytes("[1,2]", ""), "must be a JSON object");
  expect_bad(dir, safetensors_bytes("{\"a\":\"\\q\"}", ""), "invalid escape");
  expect_bad(dir, safetensors_bytes("{\"a\":\"\xff\"}", ""), "invalid UTF-8");
  expect_bad(dir, safetensors_bytes("{\"a\":\"\\ud800\"}", ""), "unpaired surrogate");
  expect_bad(dir, safetensors_bytes("{\"a\":\"x\ny\"}", ""), "control character");
  expect_bad(dir, safetensors_bytes(std::string(10000, '[') + std::string(10000, ']'), ""),
             "nesting deeper");
  const std::string entry = "{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}";
  expect_bad(dir, safetensors_bytes("{\"t\":" + entry + ",\"t\":" + entry + "}", "x"),
             "duplicate key \"t\"");
  expect_bad(dir, safetensors_bytes("{\"__metadata__\":{\"k\":1}}", ""),
             "__metadata__ value of \"k\" must be a string");
  expect_bad(dir, safetensors_bytes("{\"__metadata__\":[]}", ""), "__metadata__ must be an object");
}

void bad_tensors() {
  TempDir dir;
  const std::string d24(24, '\0');
  expect_bad(dir, one_tensor("[]", ""), "tensor \"t\": entry must be an object");
  expect_bad(dir, one_tensor("{\"shape\":[6],\"data_offsets\":[0,24]}", d24),
             "tensor \"t\": missing \"dtype\"");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"data_offsets\":[0,24]}", d24),
             "tensor \"t\": missing \"shape\"");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[6]}", d24),
             "tensor \"t\": missing \"data_offsets\"");
  expect_bad(dir, one_tensor("{\"dtype\":\"F17\",\"shape\":[6],\"data_offsets\":[0,24]}", d24),
             "unknown dtype \"F17\"");
  expect_bad(dir, one_tensor("{\"dtype\":32,\"shape\":[6],\"data_offsets\":[0,24]}", d24),
             "\"dtype\" must be a string");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[-6],\"data_offsets\":[0,24]}", d24),
             "non-negative integers");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[6.5],\"data_offsets\":[0,24]}", d24),
             "non-negative integers");
  expect_bad(
      dir,
      one_tensor("{\"dtype\":\"F32\",\"shape\":[1000000000000000000],\"data_offsets\":[0,24]}",
                 d24),
      "absurd");
  expect_bad(dir,
             one_tensor("{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                        "\"data_offsets\":[0,24]}",
                        d24),
             "more elements than any file can hold");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0]}", d24),
             "\"data_offsets\" must be [begin, end]");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[24,0]}", d24),
             "begin after end");
  expect_bad(dir,
             one_tensor("{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}", d24.substr(4)),
             "run past the end of the data");
  expect_bad(dir, one_tensor("{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,24]}", d24),
             "hold 24 bytes, but F32 shape [5] needs 20 bytes");
  expect_bad(dir, one_tensor("{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}", "ab"),
             "needs a whole number of bytes");
  expect_bad(dir,
             safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                               "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                               d24),
             "tensor \"b\" data_offsets [8, 24] overlap tensor \"a\" [0, 16]");
}

void good_edge_cases() {
  TempDir dir;
  const std::string path = dir.file("ok.safetensors");
  // Escapes in names and metadata, sub-byte and F8 types, an empty tensor, a gap, header padding.
  const std::string header =
      "{\"__metadata__\":{\"k\\n\":\"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\/\"},"
      "\"w\\u0041\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]},"
      "\"e\":{\"dtype\":\"BF16\",\"shape\":[2,0],\"data_offsets\":[2,2]},"
      "\"f8\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[4,6]},"
      "\"b\":{\"dtype\":\"BOOL\",\"shape\":[],\"data_offsets\":[6,7]}}    ";
  // F8_E4M3 (bias 7): 0x38 = 1.0, 0xC0 = −2.0; BOOL: 1
  write_file(path, safetensors_bytes(header, std::string("ab\0\0\x38\xC0\x01", 7)));
  auto file = SafetensorsFile::open(path);
  CHECK_EQ(file->metadata().at("k\n"), std::string("caf\xC3\xA9 \xF0\x9F\x98\x80 \"q\" /"));
  CHECK(file->find("wA") != nullptr);
  CHECK_EQ(file->tensors().size(), size_t{4});
  const TensorInfo* e = file->find("e");
  CHECK(e && e->elements() == 0 && e->nbytes() == 0);
  const TensorInfo* f8 = file->find("f8");
  CHECK(f8 != nullptr);
  if (f8) {
    auto bytes = file->read_tensor(*f8);
    auto v = decode_tensor_f64(f8->dtype, bytes.data(), bytes.size());
    CHECK(v == (std::vector<double>{1.0, -2.0}));
  }
  const TensorInfo* b = file->find("b");
  CHECK(b && b->shape.empty() && b->elements() == 1);
  CHECK_THROWS(InvalidArgumentError, decode_tensor_f64(StDType::kF4, nullptr, 2), "F4");
}

void io_errors() {
  TempDir dir;
  bool thrown = false;
  try {
    SafetensorsFile::open(dir.path() + "/does-not-exist.safetensors");
  } catch (const IoError& e) {
    thrown = true;
    CHECK_EQ(std::string(e.code()), std::string("ENOENT"));
    CHECK_EQ(std::string(e.name()), std::string("IoError"));
    CHECK(std::string(e.what()).find("does-not-exist.safetensors") != std::string::npos);
  }
  CHECK(thrown);
  CHECK_THROWS(ModelFormatError, SafetensorsFile::open(dir.path()), "not a regular file");
}

void truncated_after_open() {
  TempDir dir;
  const std::string path = dir.file("shrinks.safetensors");
  write_safetensors(path, {}, {{"x", "F32", {4}, std::string(16, '\x01')}});
  auto file = SafetensorsFile::open(path);
  const TensorInfo* x = file->find("x");
  CHECK(x != nullptr);
  CHECK(truncate(path.c_str(), static_cast<off_t>(x->begin + 8)) == 0);
  CHECK_THROWS(ModelFormatError, file->read_tensor(*x), "was it truncated after it was opened");
  uint8_t buf[4];
  CHECK_THROWS(ModelFormatError, file->read(file->file_bytes() - 2, buf, 4), "past the end");
}

void dtype_table() {
  StDType t;
  for (const char* name : {"BOOL", "U8",  "I8",   "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                           "U16",  "F16", "BF16", "I32",     "U32",     "F32",     "F64",
                           "I64",  "U64", "C64",  "F4",      "F6_E2M3", "F6_E3M2"}) {
    CHECK(st_dtype_from_name(name, &t));
    CHECK_EQ(std::string(st_dtype_name(t)), std::string(name));
  }
  CHECK(!st_dtype_from_name("f32", &t));
  CHECK(st_dtype_from_name("BF16", &t) && st_dtype_bits(t) == 16);
  CHECK(st_dtype_from_name("F6_E3M2", &t) && st_dtype_bits(t) == 6);
}

}  // namespace

int main() {
  return run_all({
      {"fixture_single_files", fixture_single_files},
      {"fixture_overall", fixture_overall},
      {"bad_lengths", bad_lengths},
      {"bad_json", bad_json},
      {"bad_tensors", bad_tensors},
      {"good_edge_cases", good_edge_cases},
      {"io_errors", io_errors},
      {"truncated_after_open", truncated_after_open},
      {"dtype_table", dtype_table},
  });
}
