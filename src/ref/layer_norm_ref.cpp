// Reference layer normalization and RMS normalization: plain loops over rows,
// every sum in double, each formula written as the textbook states it. Never
// optimized: the oracle the fast kernels are tested against, and the
// implementation behind the double-precision API.
#include <cmath>

#include "kernels/layer_norm.hpp"

namespace normkit::kernels::ln::ref {

namespace {
double value_or(const auto* p, int64_t j, double fallback) {
  return p ? static_cast<double>(p[j]) : fallback;
}
}  // namespace

// LayerNorm, per row of N values:
//   mean = Σx / N;  var = Σ(x - mean)² / N  (two passes, so no cancellation);
//   invstd = 1 / sqrt(var + eps);  y = (x - mean)·invstd·γ + β.
// RMSNorm: mean = 0 and no β: invstd = 1 / sqrt(Σx² / N + eps);  y = x·invstd·γ.
template <class T>
void forward(const Forward<T>& p) {
  const bool centred = p.centering == Centering::layer;
  const double n = static_cast<double>(p.cols);
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* x = p.x + r * p.x_stride;
    T* y = p.y + r * p.y_stride;
    double mean = 0;
    if (centred) {
      double sum = 0;
      for (int64_t j = 0; j < p.cols; ++j) sum += x[j];
      mean = sum / n;
    }
    double m2 = 0;
    for (int64_t j = 0; j < p.cols; ++j) {
      const double d = static_cast<double>(x[j]) - mean;
      m2 += d * d;
    }
    const double invstd = 1.0 / std::sqrt(m2 / n + p.eps);
    if (p.mean) p.mean[r] = mean;
    p.invstd[r] = invstd;
    for (int64_t j = 0; j < p.cols; ++j) {
      const double x_hat = (static_cast<double>(x[j]) - mean) * invstd;
      y[j] = static_cast<T>(x_hat * value_or(p.gamma, j, 1.0) + value_or(p.beta, j, 0.0));
    }
  }
}

// Per row, x̂ = (x - mean)·invstd and g = dy·γ (y = x̂·γ + β):
//   LayerNorm: dx = invstd·(g - Σg/N - x̂·Σ(g·x̂)/N)
//     (term Σg/N: the mean depends on x; term x̂·Σ(g·x̂)/N: the variance does)
//   RMSNorm (mean = 0): dx = invstd·(g - x̂·Σ(g·x̂)/N)
//   dγ = Σ_rows dy·x̂,  dβ = Σ_rows dy  (column sums over all rows).
template <class T>
void backward(const Backward<T>& p) {
  const bool centred = p.centering == Centering::layer;
  const double n = static_cast<double>(p.cols);
  if (p.dgamma)
    for (int64_t j = 0; j < p.cols; ++j) p.dgamma[j] = 0;
  if (p.dbeta)
    for (int64_t j = 0; j < p.cols; ++j) p.dbeta[j] = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* x = p.x + r * p.x_stride;
    const T* dy = p.dy + r * p.dy_stride;
    const double mean = centred ? p.mean[r] : 0.0, invstd = p.invstd[r];
    auto x_hat = [&](int64_t j) { return (static_cast<double>(x[j]) - mean) * invstd; };
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t j = 0; j < p.cols; ++j) {
      const double g = static_cast<double>(dy[j]) * value_or(p.gamma, j, 1.0);
      sum_g += g;
      sum_g_xhat += g * x_hat(j);
    }
    if (!centred) sum_g = 0;
    // Parameter gradients first: dx may be dy or x itself (in place).
    for (int64_t j = 0; j < p.cols; ++j) {
      if (p.dgamma) p.dgamma[j] += static_cast<double>(dy[j]) * x_hat(j);
      if (p.dbeta) p.dbeta[j] += static_cast<double>(dy[j]);
    }
    if (!p.dx) continue;
    T* dx = p.dx + r * p.dx_stride;
    for (int64_t j = 0; j < p.cols; ++j) {
      const double g = static_cast<double>(dy[j]) * value_or(p.gamma, j, 1.0);
      dx[j] = static_cast<T>(invstd * (g - sum_g / n - x_hat(j) * sum_g_xhat / n));
    }
  }
}

template void forward<float>(const Forward<float>&);
template void forward<double>(const Forward<double>&);
template void backward<float>(const Backward<float>&);
template void backward<double>(const Backward<double>&);

}  // namespace normkit::kernels::ln::ref
