#pragma once
// Variants of batch normalization that address its weak points, built on the
// batch-norm kernels (batch_norm.hpp): the statistics, the per-channel apply and
// the backward are BN's, only the per-channel coefficients differ.
//
// Conventions, spans and errors are those of batch_norm.hpp: spans of
// per-channel values hold exactly C values (empty = absent where allowed),
// float views run the fast kernels and double views the reference, and every
// function checks all of its arguments before it writes anything.
#include <cstdint>
#include <span>

#include "normkit/batch_norm.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

// ---------------------------------------------------------------- Batch Renormalization
// Ioffe 2017, "Batch Renormalization" (arXiv 1702.03275), Algorithm 1. Per channel,
// with the batch's μ_B and σ_B = sqrt(var_B + eps) (var_B biased, as BN normalizes)
// and the running μ and σ = sqrt(running_var + eps):
//   r = clip(σ_B / σ, 1/rmax, rmax),   d = clip((μ_B − μ) / σ, −dmax, dmax)
//   x̂ = (x − μ_B) / σ_B · r + d,       y = γ·x̂ + β
// r and d are constants for the gradient (stop_gradient in the paper), so the
// backward is BN's training backward with γ·r in place of γ, and
//   dγ = Σ dy·x̂ = r·Σ dy·(x − μ_B)/σ_B + d·Σ dy,   dβ = Σ dy.
// rmax = 1, dmax = 0 is BN exactly. Inference is BN's inference with the
// running statistics (batch_norm_forward_inference).
//
// Running statistics: the paper updates μ and σ (the std) by a moving average;
// here the running mean and *variance* are updated exactly as BN updates them
// (BatchNormOptions: PyTorch's momentum and unbiased variance by default), and
// σ is derived from the running variance. Why: a renorm layer then holds the
// same state as a BN layer (running_mean, running_var, num_batches_tracked),
// its inference is BN's inference, its state_dict loads into BN and back, and
// BN folding works unchanged. The unbiased variance is what PyTorch's BN keeps
// as its estimate of the population variance; BatchNormOptions::keras() (or
// running_variance = biased) keeps the biased one. The difference from
// averaging σ is second order (Jensen) once the running statistics settle.
// r and d use the running statistics from before this batch's update.

// Clipping limits for one step: rmax >= 1, dmax >= 0, both finite.
struct RenormLimits {
  double rmax = 1.0;
  double dmax = 0.0;
};

// rmax and dmax as a function of the training step, as in the paper's
// experiments: plain BN (rmax = 1, dmax = 0) for `hold_steps`, then each limit
// rises linearly to its final value over its ramp (0 steps: at once).
// paper(): rmax = 1 and dmax = 0 for 5000 steps, rmax reaching 3 at 40k steps
// and dmax reaching 5 at 25k steps. linear(w): both ramps from step 0 to w.
struct BatchRenormSchedule {
  double rmax = 3.0, dmax = 5.0;    // final limits
  int64_t hold_steps = 0;           // steps of plain BN first
  int64_t rmax_ramp_steps = 0;      // then rmax goes 1 -> rmax over this many steps
  int64_t dmax_ramp_steps = 0;      // and dmax 0 -> dmax over this many

  static BatchRenormSchedule paper() { return {3.0, 5.0, 5000, 35000, 20000}; }
  static BatchRenormSchedule linear(int64_t warmup_steps, double rmax = 3.0, double dmax = 5.0) {
    return {rmax, dmax, 0, warmup_steps, warmup_steps};
  }
  // The limits at `step` (0-based: the number of training steps before this
  // one). Throws normkit::Error for rmax < 1, dmax < 0, negative step counts.
  RenormLimits at(int64_t step) const;
};

template <class T>
struct RenormSaved {
  std::span<T> mean;    // μ_B
  std::span<T> invstd;  // 1 / σ_B
  std::span<T> r;       // the correction factors used (backward needs mean, invstd and r;
  std::span<T> d;       //   dγ needs d as well)
};

// Training forward. running.mean and running.var are required (they define r
// and d) and are updated as BN updates them; any saved span may be empty.
// A batch with NaN or infinity raises a runtime error before anything is
// written (y included). y may alias x when both have the same strides.
template <class T>
void batch_renorm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                   std::span<const T> gamma, std::span<const T> beta,
                                   RenormSaved<T> saved, RunningStats<T> running,
                                   RenormLimits limits, const BatchNormOptions& options = {});

// Backward with r and d constant: mean, invstd, r, d as saved by the forward.
// dx may be an empty view (data == nullptr) when only dγ and dβ are wanted.
template <class T>
void batch_renorm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                           std::span<const T> gamma, std::span<const T> mean,
                           std::span<const T> invstd, std::span<const T> r, std::span<const T> d,
                           std::span<T> dgamma, std::span<T> dbeta);

// ---------------------------------------------------------------- Ghost Batch Normalization
// Hoffer, Hubara and Soudry 2017, "Train longer, generalize better". The batch
// (axis N, the first axis of every layout) is cut into consecutive virtual
// batches of `virtual_batch_size` samples; the last one holds what is left and
// may be smaller. This is torch.split(x, virtual_batch_size), which is not
// always x.chunk(ceil(N / virtual_batch_size)) (N = 9, size 4: split gives
// 4, 4, 1; chunk(3) gives 3, 3, 3). Each virtual batch is normalized with its
// own statistics, exactly as BN applied to that slice, and the running
// statistics are updated once per virtual batch, in order (num_batches_tracked
// counts virtual batches): the same as calling BN on each slice in turn, which
// is what common implementations do. Every virtual batch needs more than one
// value per channel. Inference is BN's inference.
//
// Saved statistics hold ghost_batch_count(N, size) × C values, virtual batch g
// channel c at [g·C + c].

// Number of virtual batches: ceil(batch / virtual_batch_size).
int64_t ghost_batch_count(int64_t batch, int64_t virtual_batch_size);

// A batch with NaN or infinity raises a runtime error; running and saved
// statistics are then left as they were (y may be partly written).
template <class T>
void ghost_batch_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                       std::span<const T> gamma, std::span<const T> beta,
                                       int64_t virtual_batch_size, SavedStats<T> saved,
                                       RunningStats<T> running,
                                       const BatchNormOptions& options = {});

// BN's training backward on each virtual batch with its saved statistics;
// dγ and dβ are summed over the virtual batches.
template <class T>
void ghost_batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                               std::span<const T> gamma, int64_t virtual_batch_size,
                               std::span<const T> mean, std::span<const T> invstd,
                               std::span<T> dgamma, std::span<T> dbeta);

// ---------------------------------------------------------------- Frozen batch normalization
// BN that uses and keeps its running statistics, in training too (detection and
// fine-tuning with small batches): the forward is batch_norm_forward_inference,
// the statistics are constants, and γ and β still receive gradients:
//   dx = γ·dy / sqrt(running_var + eps),  dγ = Σ dy·x̂,  dβ = Σ dy,
//   x̂ = (x − running_mean) / sqrt(running_var + eps).
// Nothing is updated. This is batch_norm_backward in BackwardMode::frozen with
// the running mean and batch_norm_invstd(running_var, eps).
template <class T>
void frozen_batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                                std::span<const T> gamma, std::span<const T> running_mean,
                                std::span<const T> running_var, double eps, std::span<T> dgamma,
                                std::span<T> dbeta);

}  // namespace normkit
