#pragma once
// Library-internal entry points of batch_norm.cpp for the BN variants
// (bn_variants.cpp): the checked, dispatched apply with statistics in double.
#include <span>

#include "normkit/tensor.hpp"

namespace normkit::detail {

// batch_norm_forward_apply with the mean and invstd in double, as forward-training
// passes them to the kernels: a float mean would lose the digits of large means,
// and the result is bitwise what forward-training computes from the same statistics.
template <class T>
void batch_norm_apply_double_stats(ConstTensorView<T> x, TensorView<T> y,
                                   std::span<const T> gamma, std::span<const T> beta,
                                   std::span<const double> mean, std::span<const double> invstd);

}  // namespace normkit::detail
