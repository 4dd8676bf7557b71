// JEDI_CHECK(cond, parts...): TORCH_CHECK whose message never inserts a number into a std::ostream.
//
// On the H100 machine of 2026-11-27 (torch 2.11.0+cu130 wheel, extension built by Ubuntu's g++ 13.3 against
// libstdc++ 6.0.33) every `std::ostream << integer` compiled into an extension segfaulted, a plain
// std::ostringstream as much as TORCH_CHECK's message formatting (c10::str), while streaming strings and ScalarType
// names, std::to_string and throwing worked (tools/ext_throw_probe.py --inline; the same code raises on the CPU
// machine with g++ 12). A failed argument check then killed the process instead of raising. JEDI_CHECK builds its
// message by string concatenation only and hands TORCH_CHECK one std::string, which c10::str passes through.
// Every check in csrc/ uses it (tests/kernels/test_ext_sources.py keeps it so).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace jedi {
namespace msg {

inline std::string part(const char* s) { return s != nullptr ? s : "(null)"; }
inline std::string part(const std::string& s) { return s; }
inline std::string part(c10::ScalarType t) { return c10::toString(t); }
inline std::string part(const c10::Device& d) { return d.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline std::string part(T v) {
  return std::to_string(v);
}
// sizes and strides as Python prints a list: [2, 3]
inline std::string part(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(a[i]);
  }
  return s + "]";
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (s += ... += part(args));
  return s;
}

}  // namespace msg
}  // namespace jedi

#define JEDI_CHECK(cond, ...) TORCH_CHECK((cond), ::jedi::msg::cat(__VA_ARGS__))
