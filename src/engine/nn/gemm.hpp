#pragma once
// Row-major C = alpha·op(A)·op(B) + beta·C on oneDNN's sgemm (JIT, OpenMP).
#include <cstdint>

namespace normkit::nn::detail {

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

}  // namespace normkit::nn::detail
