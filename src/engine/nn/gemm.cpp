#include "nn/gemm.hpp"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <system_error>
#include <vector>

#include "normkit/engine/nn.hpp"
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

namespace normkit::nn {

KernelWarmUp::KernelWarmUp() {
  // Started with every signal blocked: the stop signals belong to their own
  // thread (stop_signals.cpp), never to one inside sgemm.
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  try {
    thread_ = std::thread([] {
      omp_set_num_threads(1);
      // One call compiles them all; 16 is the smallest size that does
      // (a 1x1x1 product takes a path of its own).
      constexpr int kSize = 16;
      std::vector<float> a(kSize * kSize, 0.0f), c(kSize * kSize);
      dnnl_sgemm('N', 'N', kSize, kSize, kSize, 1.0f, a.data(), kSize, a.data(), kSize, 0.0f,
                 c.data(), kSize);
    });
  } catch (const std::system_error&) {
    // No thread to spare: the first product compiles the kernels itself.
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
}

KernelWarmUp::~KernelWarmUp() {
  if (thread_.joinable()) thread_.join();
}

}  // namespace normkit::nn
