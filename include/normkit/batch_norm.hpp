#pragma once
// Batch normalization: forward-training, forward-inference and backward.
//
// Per channel c, over every element of that channel (all axes but C):
//   mean = Σx / M,  var = Σ(x - mean)² / M  (biased; used to normalize)
//   y = (x - mean) / sqrt(var + eps) * γ + β
// Running statistics, PyTorch's convention (the default):
//   running = (1 - momentum) * running + momentum * batch_value,
//   with the unbiased variance var * M / (M - 1);
//   momentum = nullopt: cumulative average, momentum = 1 / num_batches_tracked.
// Keras' convention (BatchNormOptions::keras()):
//   moving = momentum * moving + (1 - momentum) * batch_value, biased variance.
//
// Spans of per-channel values (γ, β, statistics) must hold exactly C values;
// an empty span means "absent": γ = 1, β = 0, statistics not saved or not
// tracked, gradients not wanted. float views run the fast kernels; double views
// run the reference implementation (exact, not fast). Every function validates
// all of its arguments first and throws normkit::Error before changing anything.
// One check needs the data itself: forward-training raises a runtime error when
// a channel's statistics are NaN or infinite; y has been written by then, but
// saved and running statistics are left as they were.
#include <cstdint>
#include <optional>
#include <span>

#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

enum class MomentumConvention {
  weight_on_new,  // PyTorch: running = (1 - m) * running + m * batch
  weight_on_old,  // Keras:   moving  = m * moving + (1 - m) * batch
};

enum class RunningVariance { unbiased, biased };

struct BatchNormOptions {
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;  // nullopt: cumulative moving average
  MomentumConvention momentum_convention = MomentumConvention::weight_on_new;
  RunningVariance running_variance = RunningVariance::unbiased;

  // tf.keras.layers.BatchNormalization's defaults: eps 1e-3, momentum 0.99 on
  // the old value, biased moving variance.
  static BatchNormOptions keras() {
    return {1e-3, 0.99, MomentumConvention::weight_on_old, RunningVariance::biased};
  }
};

template <class T>
struct RunningStats {
  std::span<T> mean;  // empty: running statistics are not tracked
  std::span<T> var;
  int64_t* num_batches_tracked = nullptr;  // incremented when given; required for momentum = nullopt
};

// Outputs of forward-training that backward needs, as PyTorch saves them.
template <class T>
struct SavedStats {
  std::span<T> mean;    // batch mean
  std::span<T> invstd;  // 1 / sqrt(biased batch variance + eps)
};

// y may alias x (in place) only when both have the same strides.
template <class T>
void batch_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                 std::span<const T> gamma, std::span<const T> beta,
                                 SavedStats<T> saved, RunningStats<T> running,
                                 const BatchNormOptions& options = {});

// y = (x - running_mean) / sqrt(running_var + eps) * γ + β.
template <class T>
void batch_norm_forward_inference(ConstTensorView<T> x, TensorView<T> y,
                                  std::span<const T> gamma, std::span<const T> beta,
                                  std::span<const T> running_mean,
                                  std::span<const T> running_var, double eps = 1e-5);

enum class BackwardMode {
  training,  // the statistics were the batch's own: gradients flow through mean and var
  frozen,    // global (running) statistics, constants: dx = γ * invstd * dy
};

// training: mean/invstd are forward-training's saved statistics;
// frozen:   mean is the running mean, invstd = 1 / sqrt(running_var + eps)
//           (batch_norm_invstd computes it).
//   dβ = Σdy,  dγ = Σ dy * x̂,  x̂ = (x - mean) * invstd
//   training: dx = γ * invstd * (dy - dβ / M - x̂ * dγ / M)
//   frozen:   dx = γ * invstd * dy
// dx may be an empty view (data == nullptr) when only dγ, dβ are wanted.
template <class T>
void batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                         std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta,
                         BackwardMode mode = BackwardMode::training);

// Per-channel statistics of x as mergeable partials: combine them across
// processes with Moments::merge, then normalize with batch_norm_forward_apply.
template <class T>
void batch_norm_moments(ConstTensorView<T> x, std::span<Moments> moments);

// y = (x - mean) * invstd * γ + β with given statistics (inference, or the
// second half of a forward-training whose statistics came from elsewhere).
template <class T>
void batch_norm_forward_apply(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                              std::span<const T> beta, std::span<const T> mean,
                              std::span<const T> invstd);

// Updates running statistics from batch moments, as forward-training does.
template <class T>
void batch_norm_update_running(std::span<const Moments> moments, RunningStats<T> running,
                               const BatchNormOptions& options = {});

// Synchronized (data-parallel) batch normalization: each process holds a shard of
// the batch, and the statistics and gradient sums of the whole batch are
// assembled from every shard's partials between the halves below.
//   forward:  batch_norm_moments (this shard) -> merge every shard's, in a fixed
//             order (Moments::merge) -> batch_norm_forward_from_moments
//   backward: batch_norm_backward_reduce (this shard's Σdy, Σdy·x̂) -> add every
//             shard's, in a fixed order -> batch_norm_backward_apply
// With one shard the halves give what forward-training and backward give
// (bitwise for float data). dγ and dβ of the whole batch are the summed Σdy·x̂
// and Σdy.

// The second half of forward-training with the statistics of `moments` (the
// whole batch's): y = (x - mean) / sqrt(biased var + eps) * γ + β, saved
// statistics and running statistics as batch_norm_forward_training writes them.
// Every channel needs a count above 1; non-finite moments raise a runtime error
// before anything is written.
template <class T>
void batch_norm_forward_from_moments(ConstTensorView<T> x, TensorView<T> y,
                                     std::span<const T> gamma, std::span<const T> beta,
                                     std::span<const Moments> moments, SavedStats<T> saved,
                                     RunningStats<T> running, const BatchNormOptions& options = {});

// The statistics half of batch_norm_forward_from_moments, without y: saved
// and running statistics from the whole batch's moments, checked as there, for
// a caller that applies the normalization itself, fused with what follows it
// (the engine's batchnorm, relu, 2×2 max pooling in one pass).
template <class T>
void batch_norm_statistics_from_moments(std::span<const Moments> moments, SavedStats<T> saved,
                                        RunningStats<T> running,
                                        const BatchNormOptions& options = {});

// This shard's per-channel Σdy and Σdy·x̂, x̂ = (x - mean)·invstd, in double
// (mean and invstd: the whole batch's, as forward saved them). Any number of
// values per channel, one included.
template <class T>
void batch_norm_backward_reduce(ConstTensorView<T> x, ConstTensorView<T> dy,
                                std::span<const T> mean, std::span<const T> invstd,
                                std::span<double> sum_dy, std::span<double> sum_dy_xhat);

// Training-mode dx of this shard from the whole batch's sums over `count` values
// per channel: dx = γ·invstd·(dy - Σdy/count - x̂·Σdy·x̂/count). count must be
// above 1 and at least this shard's values per channel.
template <class T>
void batch_norm_backward_apply(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                               std::span<const T> gamma, std::span<const T> mean,
                               std::span<const T> invstd, std::span<const double> sum_dy,
                               std::span<const double> sum_dy_xhat, double count);

// invstd[c] = 1 / sqrt(var[c] + eps).
template <class T>
void batch_norm_invstd(std::span<const T> var, double eps, std::span<T> invstd);

}  // namespace normkit
