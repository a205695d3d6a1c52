#pragma once
// Group normalization and instance normalization: forward and backward.
//
// GroupNorm(G) (Wu & He 2018). The C channels are cut into G groups of C/G
// consecutive channels. Per sample n and group g, over the C/G channels of the
// group and every spatial position (M = C/G · S values):
//   mean = Σx / M,  var = Σ(x - mean)² / M  (biased),  invstd = 1 / sqrt(var + eps)
//   y = (x - mean) · invstd · γ[c] + β[c]          (γ, β: one per channel)
// The saved statistics are one mean and one invstd per (n, g), N·G values in
// the order n·G + g, as PyTorch's native_group_norm saves them.
// Backward, with x̂ = (x - mean)·invstd and the sums over the M values of (n, g):
//   dβ[c] = Σ_n Σ_s dy,   dγ[c] = Σ_n Σ_s dy·x̂
//   dx = invstd · (γ[c]·dy - Σ(γ·dy)/M - x̂ · Σ(γ·dy·x̂)/M)
//
// InstanceNorm (Ulyanov et al. 2016) is GroupNorm with G = C: statistics per
// (n, c) over the spatial positions alone. It has its own functions because of
// the running statistics, which follow PyTorch's instance_norm: with
// track_running_stats, training updates them from the batch average of the
// per-instance statistics,
//   running_mean = (1 - m)·running_mean + m · (1/N)·Σ_n mean[n, c]
//   running_var  = (1 - m)·running_var  + m · (1/N)·Σ_n var_unbiased[n, c]
//   (var_unbiased = var · S / (S - 1); BatchNormOptions picks the convention
//   exactly as for batch norm), and inference (PyTorch's use_input_stats=False)
// normalizes with them per channel, which is batch_norm_forward_inference.
//
// Tensors take every layout of tensor.hpp (NC, NCL, NCHW, NCDHW and
// channels-last NLC, NHWC, NDHWC, or a logical layout with any strides that let
// the spatial axes be viewed as one); the kernels choose their path from the
// strides. An empty span means "absent" (γ = 1, β = 0, statistics not saved,
// gradient not wanted); dx may be an empty view (data == nullptr). float views
// run the fast kernels, double views the reference implementation. Every
// function checks all arguments first and throws normkit::Error before it
// writes anything. NaN or infinity in x propagates to y and the saved
// statistics, as in PyTorch (there is no state to protect), except when
// instance norm updates running statistics: then, as batch norm, it raises a
// runtime error after y is written and leaves saved and running statistics
// unchanged. Results are bitwise identical for any thread count.
#include <cstdint>
#include <span>

#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

// saved.mean / saved.invstd: N·G values each (or empty). y may alias x (in
// place) when both have the same strides. C must be divisible by num_groups.
template <class T>
void group_norm_forward(ConstTensorView<T> x, TensorView<T> y, int64_t num_groups,
                        std::span<const T> gamma, std::span<const T> beta, SavedStats<T> saved,
                        double eps = 1e-5);

// mean / invstd: the N·G statistics group_norm_forward saved. dgamma, dbeta:
// C values or empty.
template <class T>
void group_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                         int64_t num_groups, std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta);

// Per-(n, g) statistics as mergeable partials (N·G values, order n·G + g).
template <class T>
void group_norm_moments(ConstTensorView<T> x, int64_t num_groups, std::span<Moments> moments);

// Instance statistics (PyTorch's use_input_stats=True). saved: N·C values;
// running: C values each, or empty (track_running_stats=False). Needs more
// than one spatial position (as PyTorch: "Expected more than 1 spatial element
// when training"). options.eps normalizes; momentum and conventions as batch norm.
template <class T>
void instance_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                    std::span<const T> gamma, std::span<const T> beta,
                                    SavedStats<T> saved, RunningStats<T> running,
                                    const BatchNormOptions& options = {});

// With the running statistics (use_input_stats=False): per channel,
// y = (x - running_mean) / sqrt(running_var + eps) · γ + β. Its gradient is
// batch_norm_backward in BackwardMode::frozen.
template <class T>
void instance_norm_forward_inference(ConstTensorView<T> x, TensorView<T> y,
                                     std::span<const T> gamma, std::span<const T> beta,
                                     std::span<const T> running_mean,
                                     std::span<const T> running_var, double eps = 1e-5);

// Backward of instance_norm_forward_training: group_norm_backward with G = C
// (mean, invstd: the N·C saved statistics).
template <class T>
void instance_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                            std::span<const T> gamma, std::span<const T> mean,
                            std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta);

}  // namespace normkit
