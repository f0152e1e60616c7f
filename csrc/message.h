// Error messages of csl_fast's C++ code, formatted without std::ostream.
//
// TORCH_CHECK formats its message through an std::ostringstream in the extension's own code.
// On the H200 check (benchmarks/results/gpu-check-h200-2026-12-04.md) an extension built by
// that machine's /opt/gcc/bin/g++ crashed with SIGSEGV on every message that inserted a
// number into that stream, whatever the exception type, build flags or link flags
// (benchmarks/exception_probe.py): a bad argument killed the process instead of raising.
// Numbers go through std::to_string / std::snprintf here, and the macros below hand
// TORCH_CHECK one finished std::string, which it passes on without a stream. The message is
// built only when the check fails, as TORCH_CHECK's own arguments are.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace csl_fast {

template <class T>
inline constexpr bool kUnformattable = false;

template <class T>
void append_to_message(std::string& out, const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    out += value ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    out += value;
  } else if constexpr (std::is_integral_v<T>) {
    out += std::to_string(value);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(value));
    out += buf;
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    out.append(std::string_view(value));
  } else if constexpr (std::is_same_v<T, c10::ScalarType>) {
    out += c10::toString(value);
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    out += value.str();
  } else if constexpr (std::is_convertible_v<const T&, c10::IntArrayRef>) {
    const c10::IntArrayRef values(value);
    out += '[';
    for (size_t i = 0; i < values.size(); ++i) {
      if (i) out += ", ";
      out += std::to_string(values[i]);
    }
    out += ']';
  } else {
    static_assert(kUnformattable<T>, "csl_fast::message: add this argument type");
  }
}

template <class... Args>
std::string message(const Args&... args) {
  std::string out;
  (append_to_message(out, args), ...);
  return out;
}

}  // namespace csl_fast

#define CSL_CHECK(cond, ...) TORCH_CHECK(cond, ::csl_fast::message(__VA_ARGS__))
#define CSL_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::csl_fast::message(__VA_ARGS__))
#define CSL_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::csl_fast::message(__VA_ARGS__))
#define CSL_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, ::csl_fast::message(__VA_ARGS__))
