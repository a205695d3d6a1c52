#include "nn/gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>

#include "normkit/threading.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  // oneDNN threads over omp_get_max_threads(); small products are faster on
  // fewer threads than the cost of waking the others (see Linear's
  // kMultiplyAddsPerChunk: at 1M per thread, mlp-paper's dW of 100x784 over
  // 64 samples took 223 us per step on 2 threads against 68 us on one).
  constexpr int64_t kMultiplyAddsPerThread = 4 << 20;
  const int threads = static_cast<int>(
      std::clamp<int64_t>(m * n * k / kMultiplyAddsPerThread, 1, num_threads()));
  const int previous = omp_get_max_threads();
  omp_set_num_threads(threads);
  const dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', m, n,
                                          k, alpha, a, lda, b, ldb, beta, c, ldc);
  omp_set_num_threads(previous);
  if (status != dnnl_success)
    engine::fail_runtime("oneDNN sgemm failed (status ", static_cast<int>(status), ") for ",
                                  m, "x", n, "x", k);
}

}  // namespace normkit::nn::detail
