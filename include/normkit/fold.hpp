#pragma once
// Folding an inference-mode batch normalization into the Linear or Conv2d
// layer before it.
//
// A layer y = W·x + b followed by BN with running statistics gives, for each
// output channel c (W_c: the weights of channel c, one row of W),
//   BN(y)_c = (W_c·x + b_c − μ_c)·s_c + β_c,   s_c = γ_c / sqrt(σ²_c + eps)
//           = (W_c·s_c)·x + ((b_c − μ_c)·s_c + β_c)
// so the pair is one layer with
//   W'_c = W_c·s_c,   b'_c = (b_c − μ_c)·s_c + β_c     (b = 0 without a bias).
// Only inference is preserved: in training BN normalizes with the batch's own
// statistics, which no fixed layer can reproduce.
//
// Weights are a span of out_channels × rest values, channel-major: PyTorch's
// [out, in] for Linear and [out, in, kh, kw] (OIHW) for Conv2d, where
// out_channels is the size of the running statistics. s_c, b'_c and each
// product W·s_c are computed in double and rounded once to T, so a folded
// float weight is the product correctly rounded (to within double's error).
//
// As in batch_norm.hpp, an empty γ means 1, an empty β or bias means 0. Every
// argument is checked before anything is written; normkit::Error
// (invalid_argument) names the argument and the value: sizes, eps ≤ 0 or not
// finite, NaN or infinity in any input, σ² + eps ≤ 0, a folded value that
// overflows T. folded_weight may be weight itself and folded_bias may be bias
// itself (in place); any other overlap between an output and an input or the
// other output is an error.
#include <span>

namespace normkit {

template <class T>
void fold_batch_norm(std::span<const T> weight, std::span<const T> bias,
                     std::span<const T> gamma, std::span<const T> beta,
                     std::span<const T> running_mean, std::span<const T> running_var, double eps,
                     std::span<T> folded_weight, std::span<T> folded_bias);

}  // namespace normkit
