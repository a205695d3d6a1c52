#pragma once
// How many threads a piece of work deserves. Opening a parallel region costs
// microseconds, and on a shared machine a region stalls whenever another
// process holds one of its cores, so small work runs on fewer threads.
// Results never depend on the choice (see threading.hpp).
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "normkit/threading.hpp"

namespace normkit::detail {

constexpr int64_t kElementsPerThread = 32768;

inline int threads_for(int64_t elements) {
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, num_threads()));
}

// Every kernel's parallel region: body() on `threads` threads, or on the
// calling thread alone, without a region, when that is one. libgomp builds a
// team even for a region of one, which cost 2.1 us a call (a batch norm of
// 64x100: 3.8 us with it, 1.7 us without), as much as a small problem's data
// passes. Inside body, `#pragma omp for`, `single` and `barrier` work either
// way: outside a region they bind to a team of the calling thread alone.
// Inside a caller's active region they would bind to the caller's team, so
// there a region of one is opened as before.
inline bool runs_alone(int threads) { return threads <= 1 && !omp_in_parallel(); }

template <class Body>
void parallel_region(int threads, Body&& body) {
  if (runs_alone(threads)) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

// body(i) for i in [0, count), statically split over `threads` threads (or
// in order on the calling thread, when that is one).
template <class Body>
void parallel_for(int threads, int64_t count, Body&& body) {
  if (runs_alone(threads)) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) body(i);
}

}  // namespace normkit::detail
