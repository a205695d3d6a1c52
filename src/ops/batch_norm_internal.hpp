#pragma once
// What the op files of the batch-norm family share (batch_norm.cpp,
// bn_variants.cpp, batch_norm_fused.cpp, group_norm.cpp).
#include <span>
#include <vector>

#include "core/simd_clones.hpp"
#include "kernels/batch_norm.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit::detail {

// batch_norm_forward_apply with the mean and invstd in double, as forward-training
// passes them to the kernels: a float mean would lose the digits of large means,
// and the result is bitwise what forward-training computes from the same statistics.
// `op` names the caller in NORMKIT_VERBOSE's lines.
template <class T>
void batch_norm_apply_double_stats(ConstTensorView<T> x, TensorView<T> y,
                                   std::span<const T> gamma, std::span<const T> beta,
                                   std::span<const double> mean, std::span<const double> invstd,
                                   const char* op);

namespace {

// Moments::biased_variance (ddof 0) or unbiased_variance (ddof 1) of every
// channel, in a loop that vectorizes (the choices pick operands; a division
// under a condition would not be vectorized): with thousands of channels
// (32×4096) a scalar division and square root per channel cost as much as the
// kernel. Divisions and square roots round alike in every clone.
[[maybe_unused]] NORMKIT_SIMD_CLONES void variances(const Moments* moments, size_t n,
                                                    double ddof, double* out) {
  for (size_t i = 0; i < n; ++i) {
    const double count = moments[i].count;
    out[i] = (count > ddof ? moments[i].m2 : 0.0) / (count > ddof ? count - ddof : 1.0);
  }
}

// invstd_of(biased variance) of every channel: `variances`, then a loop that
// vectorizes as well.
[[maybe_unused]] NORMKIT_SIMD_CLONES void invstds(const Moments* moments, size_t n, double eps,
                                                  double* out) {
  variances(moments, n, 0.0, out);
  for (size_t i = 0; i < n; ++i) out[i] = kernels::bn::invstd_of(out[i], eps);
}

}  // namespace

// The saved statistics from the batch moments: mean and invstd =
// 1 / sqrt(biased variance + eps), each where wanted.
template <class T>
void write_saved(std::span<const Moments> moments, SavedStats<T> saved, double eps) {
  const size_t n = moments.size();
  if (!saved.mean.empty())
    for (size_t i = 0; i < n; ++i) saved.mean[i] = static_cast<T>(moments[i].mean);
  if (!saved.invstd.empty()) {
    std::vector<double> invstd(n);
    invstds(moments.data(), n, eps, invstd.data());
    for (size_t i = 0; i < n; ++i) saved.invstd[i] = static_cast<T>(invstd[i]);
  }
}

}  // namespace normkit::detail
