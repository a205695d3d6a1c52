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
  // oneDNN threads over omp_get_max_threads(); for the engine's shapes its
  // split leaves each element's sum to one thread (the same bits on 1 and 2
  // threads: NnTraining.ResultsDoNotDependOnTheThreadCount). Small products stay
  // on one thread, as waking a second costs more than it saves: mlp-paper's
  // step (64 samples, 784 -> 100 -> ...) with all its products on 2 threads
  // (sgemm) took 348-360 us against 293 us with the CLI's short spin
  // (tools/normkit.cpp), and gained 4% only with threads that never sleep.
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
