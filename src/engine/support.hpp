#pragma once
// What the engine needs besides the kernel library's public headers: building
// normkit::Error messages, and how many threads a loop deserves. The engine
// uses the kernel library only through include/normkit/, as any user would, so
// these few lines are its own (the kernel library keeps the same two ideas in
// src/core/check.hpp and src/core/parallel.hpp).
#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

#include "normkit/error.hpp"
#include "normkit/threading.hpp"

namespace normkit::engine {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail_invalid(const Parts&... parts) {
  throw Error(ErrorKind::invalid_argument, concat(parts...));
}

template <class... Parts>
[[noreturn]] void fail_runtime(const Parts&... parts) {
  throw Error(ErrorKind::runtime, concat(parts...));
}

// Opening a parallel region costs microseconds, and on a shared machine a
// region stalls whenever another process holds one of its cores, so small
// loops run on fewer threads. Results never depend on the choice.
inline int threads_for(int64_t elements) {
  constexpr int64_t kElementsPerThread = 32768;
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, num_threads()));
}

}  // namespace normkit::engine
