#pragma once
// A small, strict JSON parser: enough for safetensors headers (objects, arrays, strings with every
// escape, numbers, true/false/null), hardened for hostile input — bounded nesting, UTF-8 checked,
// errors carry the byte offset. Object members keep their order; duplicates are kept for the
// caller to reject.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ferry {
namespace json {

struct ParseError : std::runtime_error {
  ParseError(size_t offset, const std::string& message)
      : std::runtime_error(message), offset(offset) {}
  size_t offset;
};

struct Value {
  enum class Type : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  std::string text;  // the string's value, or the number as written
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;

  bool is_object() const { return type == Type::kObject; }
  bool is_array() const { return type == Type::kArray; }
  bool is_string() const { return type == Type::kString; }
  bool is_number() const { return type == Type::kNumber; }
  const Value* find(std::string_view key) const;  // first member named key
  // An integer number (no fraction or exponent) that fits int64; false otherwise.
  bool as_int64(int64_t* out) const;
};

constexpr int kMaxDepth = 64;

Value parse(std::string_view text);  // throws ParseError
// A short JSON-ish rendering of a value for error messages (truncated).
std::string describe(const Value& value);
const char* type_name(Value::Type type);

}  // namespace json
}  // namespace ferry
