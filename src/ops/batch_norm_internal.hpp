#pragma once
// What the op files of the batch-norm family share (batch_norm.cpp,
// bn_variants.cpp, batch_norm_fused.cpp, group_norm.cpp).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>

#include "core/check.hpp"
#include "core/parallel.hpp"
#include "core/workspace.hpp"
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
// mean, and invstd = 1 / sqrt(biased variance + eps), or from `given` (the
// kernel's invstd of the same moments) when not null.
template <class T>
[[maybe_unused]] NORMKIT_SIMD_CLONES void saved_from(const Moments* moments, size_t n, double eps,
                                                     T* mean, T* invstd,
                                                     const double* given = nullptr) {
  if (mean)
    for (size_t i = 0; i < n; ++i) mean[i] = static_cast<T>(moments[i].mean);
  if (invstd && given)
    for (size_t i = 0; i < n; ++i) invstd[i] = static_cast<T>(given[i]);
  else if (invstd)
    for (size_t i = 0; i < n; ++i)
      invstd[i] = static_cast<T>(kernels::bn::invstd_of(variance_of(moments[i], 0.0), eps));
}

// Inference's invstd from the running variance, 1 / sqrt(var + eps) rounded to
// T as bn::invstd_of's, then widened for the kernels; false when some var + eps
// is not positive (its invstd is then meaningless, and computed from 1 so that
// no floating-point exception is raised). Branch-free, so that it vectorizes:
// with thousands of channels (32×4096) a square root and a division per
// channel, one at a time, cost as much as the apply on 2 threads.
template <class T>
[[maybe_unused]] NORMKIT_SIMD_CLONES bool inference_invstd(const T* var, size_t n, double eps,
                                                           double* invstd) {
  uint64_t bad = 0;  // (not a bool: GCC would not vectorize the loop)
  for (size_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(var[i]) + eps;
    const bool positive = v > 0;
    bad |= static_cast<uint64_t>(!positive);
    invstd[i] = static_cast<double>(static_cast<T>(1.0 / std::sqrt(positive ? v : 1.0)));
  }
  return bad == 0;
}

// A channel's double square root and division cost about what 32 values of a
// data pass do: threads_for gives a thread 1024 channels (~2 us, more than
// opening a region).
constexpr int64_t kInvstdValuesPerChannel = 32;
// inference_invstd of `var` into invstd, or the error that names the first
// channel whose var + eps is not positive (`name`: the argument's name).
// Nothing else is written.
template <class T>
void checked_inference_invstd(std::span<const T> var, double eps, const char* name,
                              std::span<double> invstd) {
  // Even vectorized, 4096 channels took 9 us on one thread (a double square
  // root and division each), as long as the apply of 32 rows on two: many
  // channels are shared out (the values do not depend on how).
  const auto n = static_cast<int64_t>(var.size());
  const int threads = threads_for(n * kInvstdValuesPerChannel);
  std::atomic<bool> bad{false};
  parallel_for(threads, threads, [&](int64_t t) {
    const int64_t c0 = n * t / threads / 16 * 16;
    const int64_t c1 = t + 1 == threads ? n : n * (t + 1) / threads / 16 * 16;
    if (!inference_invstd<T>(var.data() + c0, static_cast<size_t>(c1 - c0), eps,
                             invstd.data() + c0))
      bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load(std::memory_order_relaxed)) return;
  for (size_t c = 0; c < var.size(); ++c)
    if (!(var[c] + eps > 0))
      fail_invalid(name, "[", c, "] + eps must be positive, got ", var[c]);
  fail_runtime(name, ": a value + eps is not positive");
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

// What updating running statistics with a batch takes: the batch count after
// it, the batch's weight w in running = (1 - w)·running + w·batch, and the
// batch variance's ddof.
struct RunningUpdate {
  int64_t batches;
  double w_new, ddof;
};
template <class T>
RunningUpdate running_update(const RunningStats<T>& running, const BatchNormOptions& options) {
  const int64_t batches = running.num_batches_tracked ? *running.num_batches_tracked + 1 : 0;
  const double momentum = options.momentum ? *options.momentum : 1.0 / static_cast<double>(batches);
  // weight_on_new: running = (1 - m)·running + m·batch;  weight_on_old: m·running + (1 - m)·batch.
  const double w_new =
      options.momentum_convention == MomentumConvention::weight_on_new || !options.momentum
          ? momentum
          : 1.0 - momentum;
  return {batches, w_new, options.running_variance == RunningVariance::unbiased ? 1.0 : 0.0};
}

// A forward-training's per-channel work on the batch moments (batch norm, and
// BN+ReLU): the running statistics' next values and the saved statistics,
// done for each block of channels as the kernel reports it final
// (bn::MomentsReport), on the thread that computed it, and written at once
// with the values they replace kept aside (running mean and var, saved mean
// and invstd). A fault (a moment, or
// a next value, that is NaN or beyond T's range) is only flagged there;
// conclude() then puts every value back and throws the error
// batch_norm_update_running gives, so that nothing but y changes. Otherwise
// the results are batch_norm_update_running's and write_saved's, bit for bit.
// The moments and the kept values live in the calling thread's Workspace
// (core/workspace.hpp), not in fresh vectors, and are not zeroed first: every
// kernel writes each channel's moments, and zeroing them (96 KB at 4096
// channels) was serial work the other threads waited for.
template <class T>
class TrainingEpilogue {
 public:
  TrainingEpilogue(int64_t channels, RunningStats<T> running, SavedStats<T> saved,
                   const BatchNormOptions& options)
      : moments_(workspace_.take_for_overwrite<Moments>(static_cast<size_t>(channels))),
        running_(running), saved_(saved), options_(options),
        update_(running_update(running, options)),
        kept_{kept_array(), kept_array(), kept_array(), kept_array()} {}

  // Where the kernel writes the batch moments, and how it reports them final.
  std::span<Moments> moments() const { return moments_; }
  kernels::bn::MomentsReport report() const { return {&finish, this}; }

  // After the kernel: the counter, or on a fault every value back and the error.
  void conclude() const {
    if (fault_.load()) {
      restore();
      batch_norm_update_running<T>(moments_, running_, options_);  // throws what it was
      fail_runtime("batch norm forward-training: a fault in the batch moments");
    }
    if (running_.num_batches_tracked) *running_.num_batches_tracked = update_.batches;
  }

 private:
  static constexpr int64_t kBlock = 256;  // next values on the stack: no allocation in a region

  static void finish(const void* context, int64_t c0, int64_t n, const double* invstd) {
    const auto& e = *static_cast<const TrainingEpilogue*>(context);
    const Moments* const m = e.moments_.data();
    bool ok = true;
    for (int64_t b = c0; b < c0 + n; b += kBlock) {
      const auto len = static_cast<size_t>(std::min(kBlock, c0 + n - b));
      if (!e.running_.mean.empty()) {
        double mean[kBlock], var[kBlock];
        ok &= next_running<T>(m + b, len, e.update_.ddof, e.update_.w_new,
                              e.running_.mean.data() + b, e.running_.var.data() + b, mean, var);
        for (size_t i = 0; i < len; ++i) {
          e.kept_[0][b + i] = std::exchange(e.running_.mean[b + i], static_cast<T>(mean[i]));
          e.kept_[1][b + i] = std::exchange(e.running_.var[b + i], static_cast<T>(var[i]));
        }
      } else {
        ok &= usable(m + b, len);
      }
      T* const saved_mean = e.saved_.mean.empty() ? nullptr : e.saved_.mean.data() + b;
      T* const saved_invstd = e.saved_.invstd.empty() ? nullptr : e.saved_.invstd.data() + b;
      if (saved_mean) std::copy_n(saved_mean, len, e.kept_[2] + b);
      if (saved_invstd) std::copy_n(saved_invstd, len, e.kept_[3] + b);
      saved_from<T>(m + b, len, e.options_.eps, saved_mean, saved_invstd,
                    invstd ? invstd + (b - c0) : nullptr);
    }
    if (!ok) e.fault_.store(true, std::memory_order_relaxed);
  }
  // Moments of at least 2 values, finite (check_batch_moments' test, branch-free).
  static bool usable(const Moments* m, size_t n) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; ++i)
      bad |= static_cast<uint64_t>(!(m[i].count >= 2)) |
             static_cast<uint64_t>(!std::isfinite(m[i].mean)) |
             static_cast<uint64_t>(!std::isfinite(m[i].m2));
    return bad == 0;
  }
  void restore() const {
    if (!running_.mean.empty()) {
      std::copy_n(kept_[0], running_.mean.size(), running_.mean.data());
      std::copy_n(kept_[1], running_.var.size(), running_.var.data());
    }
    std::copy_n(kept_[2], saved_.mean.size(), saved_.mean.data());
    std::copy_n(kept_[3], saved_.invstd.size(), saved_.invstd.data());
  }

  T* kept_array() { return workspace_.take_for_overwrite<T>(moments_.size()).data(); }

  Workspace workspace_;  // first: the arrays below are taken from it
  std::span<Moments> moments_;
  RunningStats<T> running_;
  SavedStats<T> saved_;
  const BatchNormOptions& options_;
  RunningUpdate update_;
  std::array<T*, 4> kept_;
  mutable std::atomic<bool> fault_{false};
};

}  // namespace

// The saved statistics from the batch moments (saved_from).
template <class T>
void write_saved(std::span<const Moments> moments, SavedStats<T> saved, double eps) {
  saved_from<T>(moments.data(), moments.size(), eps,
                saved.mean.empty() ? nullptr : saved.mean.data(),
                saved.invstd.empty() ? nullptr : saved.invstd.data());
}

}  // namespace normkit::detail
