#pragma once
// What the op files of the batch-norm family share (batch_norm.cpp,
// bn_variants.cpp, batch_norm_fused.cpp, group_norm.cpp).
#include <cmath>
#include <cstdint>
#include <limits>
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

// Moments::biased_variance (ddof 0) or unbiased_variance (ddof 1), written so
// that the per-channel loops below vectorize (the choices pick operands; a
// division under a condition would not be vectorized): with thousands of
// channels (32×4096) scalar divisions and square roots per channel cost as much
// as the kernel. Divisions and square roots round alike in every clone.
inline double variance_of(const Moments& m, double ddof) {
  return (m.count > ddof ? m.m2 : 0.0) / (m.count > ddof ? m.count - ddof : 1.0);
}

// The saved statistics from the batch moments, each where wanted (non-null):
// mean, and invstd = 1 / sqrt(biased variance + eps).
template <class T>
[[maybe_unused]] NORMKIT_SIMD_CLONES void saved_from(const Moments* moments, size_t n, double eps,
                                                     T* mean, T* invstd) {
  if (mean)
    for (size_t i = 0; i < n; ++i) mean[i] = static_cast<T>(moments[i].mean);
  if (invstd)
    for (size_t i = 0; i < n; ++i)
      invstd[i] = static_cast<T>(kernels::bn::invstd_of(variance_of(moments[i], 0.0), eps));
}

// The running statistics' next values, (1 - w)·running + w·batch, into mean and
// var (the batch variance with `ddof`); false when one of them is NaN or beyond
// T's range, or a channel's moments are of fewer than 2 values or not finite.
// Branch-free, so that it vectorizes. (src/ops is built with -ffp-contract=off:
// every clone rounds these as the baseline does.)
template <class T>
[[maybe_unused]] NORMKIT_SIMD_CLONES bool next_running(const Moments* moments, size_t n,
                                                       double ddof, double w_new,
                                                       const T* running_mean,
                                                       const T* running_var, double* mean,
                                                       double* var) {
  constexpr double kMax = std::numeric_limits<T>::max();
  constexpr double kMaxDouble = std::numeric_limits<double>::max();
  uint64_t beyond = 0;  // (not a bool: GCC would not vectorize the loop)
  for (size_t i = 0; i < n; ++i) {
    beyond |= static_cast<uint64_t>(moments[i].count < 2) |
              static_cast<uint64_t>(!(std::abs(moments[i].mean) <= kMaxDouble)) |
              static_cast<uint64_t>(!(std::abs(moments[i].m2) <= kMaxDouble));
    const double batch_var = variance_of(moments[i], ddof);
    mean[i] = (1.0 - w_new) * static_cast<double>(running_mean[i]) + w_new * moments[i].mean;
    var[i] = (1.0 - w_new) * static_cast<double>(running_var[i]) + w_new * batch_var;
    beyond |= static_cast<uint64_t>(!(std::abs(mean[i]) <= kMax)) |
              static_cast<uint64_t>(!(var[i] <= kMax));
  }
  return beyond == 0;
}

}  // namespace

// The saved statistics from the batch moments (saved_from).
template <class T>
void write_saved(std::span<const Moments> moments, SavedStats<T> saved, double eps) {
  saved_from<T>(moments.data(), moments.size(), eps,
                saved.mean.empty() ? nullptr : saved.mean.data(),
                saved.invstd.empty() ? nullptr : saved.invstd.data());
}

}  // namespace normkit::detail
