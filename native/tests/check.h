#pragma once
// A minimal check harness for the kernel tests (plain main(), no framework): CHECK macros that
// count failures and a runner over named test functions whose exit status is non-zero on failure.
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace ferry_check {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  failures()++;
}

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline int run(const std::vector<Case>& cases) {
  for (const auto& c : cases) {
    const int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      fail(c.name, 0, std::string("uncaught exception: ") + e.what());
    }
    std::fprintf(stderr, "%s %s\n", failures() == before ? "ok  " : "FAIL", c.name);
  }
  std::fprintf(stderr, "%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace ferry_check

#define KCHECK(cond)                                                \
  do {                                                              \
    if (!(cond)) ::ferry_check::fail(__FILE__, __LINE__, "" #cond); \
  } while (0)

// KCHECK with a printf-style explanation, for checks inside loops.
#define KCHECKF(cond, ...)                                                            \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      char kcheck_buf_[512];                                                          \
      std::snprintf(kcheck_buf_, sizeof kcheck_buf_, __VA_ARGS__);                    \
      ::ferry_check::fail(__FILE__, __LINE__, #cond ": " + std::string(kcheck_buf_)); \
    }                                                                                 \
  } while (0)

// Runs `stmt`, which must throw `Type`.
#define KCHECK_THROWS(Type, stmt)                                                                \
  do {                                                                                           \
    bool kcheck_thrown_ = false;                                                                 \
    try {                                                                                        \
      stmt;                                                                                      \
    } catch (const Type&) {                                                                      \
      kcheck_thrown_ = true;                                                                     \
    } catch (...) {                                                                              \
    }                                                                                            \
    if (!kcheck_thrown_) ::ferry_check::fail(__FILE__, __LINE__, #stmt " did not throw " #Type); \
  } while (0)
