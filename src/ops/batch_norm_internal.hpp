#pragma once
// What the op files of the batch-norm family share (batch_norm.cpp,
// bn_variants.cpp, batch_norm_fused.cpp, group_norm.cpp).
#include <span>
#include <vector>

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

// The saved statistics from the batch moments: mean and invstd =
// 1 / sqrt(biased variance + eps), each where wanted. Separate loops without
// branches: with thousands of channels (32×4096) they vectorize.
template <class T>
void write_saved(std::span<const Moments> moments, SavedStats<T> saved, double eps) {
  const size_t n = moments.size();
  if (!saved.mean.empty())
    for (size_t i = 0; i < n; ++i) saved.mean[i] = static_cast<T>(moments[i].mean);
  if (!saved.invstd.empty())
    for (size_t i = 0; i < n; ++i)
      saved.invstd[i] = static_cast<T>(kernels::bn::invstd_of(moments[i].biased_variance(), eps));
}

}  // namespace normkit::detail
