#include "nn/gemm.hpp"

#include <oneapi/dnnl/dnnl.h>

#include "core/check.hpp"

namespace normkit::nn::detail {

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  const dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', m, n,
                                          k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (status != dnnl_success)
    normkit::detail::fail_runtime("oneDNN sgemm failed (status ", static_cast<int>(status), ") for ",
                                  m, "x", n, "x", k);
}

}  // namespace normkit::nn::detail
