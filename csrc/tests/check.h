// The C++ tests' assertion: CHECK(cond, printf-style message) reports a failure and goes on, so
// one run lists every failing case; test_exit_status() prints the verdict and is main's return.
#pragma once

#include <cstdio>

namespace pyllm::testing {
inline int g_failures = 0;

inline int test_exit_status() {
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "OK", g_failures);
  return g_failures ? 1 : 0;
}
}  // namespace pyllm::testing

#define CHECK(cond, ...)                                \
  do {                                                  \
    if (!(cond)) {                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      ++::pyllm::testing::g_failures;                   \
    }                                                   \
  } while (0)
