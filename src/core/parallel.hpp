#pragma once
// How many threads a piece of work deserves. Opening a parallel region costs
// microseconds, and on a shared machine a region stalls whenever another
// process holds one of its cores, so small work runs on fewer threads.
// Results never depend on the choice (see threading.hpp).
#include <algorithm>
#include <cstdint>

#include "normkit/threading.hpp"

namespace normkit::detail {

constexpr int64_t kElementsPerThread = 32768;

inline int threads_for(int64_t elements) {
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, num_threads()));
}

}  // namespace normkit::detail
