#include "normkit/threading.hpp"

#include <omp.h>

#include <atomic>

#include "core/check.hpp"

namespace normkit {

namespace {
std::atomic<int> g_threads{0};  // 0: not set, use OpenMP's maximum
}

void set_num_threads(int n) {
  if (n < 1) detail::fail_invalid("set_num_threads: n must be >= 1, got ", n);
  g_threads.store(n);
}

int num_threads() noexcept {
  const int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace normkit
