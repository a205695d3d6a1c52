// The public batch-normalization functions: check every argument, pick an
// implementation, and own the running statistics. Nothing is written before
// all checks have passed, and running statistics are updated only after the
// batch statistics are known to be finite.
#include "normkit/batch_norm.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/check.hpp"
#include "core/dispatch.hpp"
#include "core/norm_checks.hpp"
#include "core/workspace.hpp"
#include "kernels/batch_norm.hpp"
#include "ops/batch_norm_internal.hpp"

namespace normkit {

using detail::check_count;
using detail::check_eps;
using detail::check_finite;
using detail::check_in_place;
using detail::check_in_place_dx;
using detail::check_running;
using detail::check_training_size;
using detail::checked_input;
using detail::checked_like;
using detail::fail_invalid;
using detail::fail_runtime;
using detail::kPerChannel;
using detail::or_null;
using detail::unify;
namespace bn = kernels::bn;

namespace {
// Every per-channel array of a call comes from the calling thread's
// Workspace (core/workspace.hpp), as forward-training's (detail::TrainingEpilogue).
using detail::Workspace;

// x, dy and dx (data == nullptr: not wanted) of a backward: checked, with the
// in-place rules, as geometries the kernels can walk together.
struct GradientGeometries {
  Geometry x, dy, dx;
};
template <class T>
GradientGeometries checked_gradients(ConstTensorView<T> x, ConstTensorView<T> dy,
                                     TensorView<T> dx) {
  Geometry gx = checked_input(x, "x");
  Geometry gdy = checked_like(dy, x, "dy");
  Geometry gdx = dx.data ? checked_like(dx, x, "dx") : gdy;
  check_in_place_dx(dx.data, gdx, x.data, gx, dy.data, gdy);
  if (dx.data)
    unify<T>(x, gx, {{&gdy, dy}, {&gdx, dx}});
  else
    unify<T>(x, gx, {{&gdy, dy}});
  if (!dx.data) gdx = gdy;
  return {gx, gdy, gdx};
}

// Why a batch's moments cannot update running statistics, as the error that
// names it: fewer than 2 values in a channel, or NaN or ∞ in x.
void check_batch_moments(std::span<const Moments> moments) {
  uint64_t too_few = 0;  // (branch-free, and not a bool, so that it vectorizes)
  for (const auto& m : moments) too_few |= static_cast<uint64_t>(m.count < 2);
  if (too_few) fail_invalid("expected more than 1 value per channel when training");
  check_finite(moments);
}
// What the statistics half of a forward-training from given moments checks:
// the counts of its arrays, and moments that can make statistics.
template <class T>
void check_statistics_from_moments(std::span<const Moments> moments, int64_t channels,
                                   SavedStats<T> saved, RunningStats<T> running,
                                   const BatchNormOptions& options) {
  check_count(moments, channels, "moments", kPerChannel, true);
  check_count(saved.mean, channels, "save_mean", kPerChannel, false);
  check_count(saved.invstd, channels, "save_invstd", kPerChannel, false);
  check_running(running, channels, options);
  for (size_t c = 0; c < moments.size(); ++c)
    if (!(moments[c].count > 1))
      fail_invalid("expected more than 1 value per channel when training, got moments of ",
                   moments[c].count, " values for channel ", c);
  check_finite(moments);
}
}  // namespace

template <class T>
void batch_norm_update_running(std::span<const Moments> moments, RunningStats<T> running,
                               const BatchNormOptions& options) {
  const auto channels = static_cast<int64_t>(moments.size());
  check_running(running, channels, options);
  if (running.mean.empty()) {
    check_batch_moments(moments);
    if (running.num_batches_tracked) ++*running.num_batches_tracked;
    return;
  }

  const auto [batches, w_new, ddof] = detail::running_update(running, options);
  // The new values first: a finite batch can still have a variance beyond T's
  // range (float32 data of ±1.4e19 and two values per channel: 4e38), which would
  // make the running variance infinite (PyTorch lets it); nothing is written then.
  // One pass computes them and finds any fault of the batch's moments; which
  // fault it was is looked for only when there is one.
  Workspace ws;
  double* const mean = ws.take_for_overwrite<double>(static_cast<size_t>(channels)).data();
  double* const var = ws.take_for_overwrite<double>(static_cast<size_t>(channels)).data();
  if (!detail::next_running<T>(moments.data(), moments.size(), ddof, w_new,
                               running.mean.data(), running.var.data(), mean, var)) {
    check_batch_moments(moments);
    constexpr double kMax = std::numeric_limits<T>::max();
    for (int64_t c = 0; c < channels; ++c)
      if (!(std::abs(mean[c]) <= kMax && var[c] <= kMax))
        fail_runtime("x: channel ", c, " would make the running ",
                     std::abs(mean[c]) <= kMax ? "variance " : "mean ",
                     std::abs(mean[c]) <= kMax ? var[c] : mean[c], ", beyond the range of ",
                     std::is_same_v<T, float> ? "float32" : "float64",
                     "; running statistics left unchanged");
  }
  if (running.num_batches_tracked) *running.num_batches_tracked = batches;
  for (int64_t c = 0; c < channels; ++c) {
    running.mean[c] = static_cast<T>(mean[c]);
    running.var[c] = static_cast<T>(var[c]);
  }
}

template <class T>
void batch_norm_forward_training(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                                 std::span<const T> beta, SavedStats<T> saved,
                                 RunningStats<T> running, const BatchNormOptions& options) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  check_in_place(y.data, gy, x.data, gx, "x");
  unify<T>(x, gx, {{&gy, y}});
  check_training_size(gx, x);
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(beta, gx.channels, "bias (beta)", kPerChannel, false);
  check_count(saved.mean, gx.channels, "save_mean", kPerChannel, false);
  check_count(saved.invstd, gx.channels, "save_invstd", kPerChannel, false);
  check_running(running, gx.channels, options);

  const detail::TrainingEpilogue<T> epilogue(gx.channels, running, saved, options);
  const bn::Forward<T> problem{gx,          gy,       x.data,           y.data, or_null(gamma),
                               or_null(beta), options.eps, epilogue.moments().data(),
                               epilogue.report()};
  detail::run("batch_norm_forward_training", bn::implementations(), &bn::Impl::forward,
              bn::ref::forward<T>, problem, gx, std::array{gy});
  epilogue.conclude();
}

template <class T>
void batch_norm_forward_apply(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                              std::span<const T> beta, std::span<const T> mean,
                              std::span<const T> invstd) {
  Workspace ws;
  detail::batch_norm_apply_double_stats<T>(x, y, gamma, beta, ws.copy<double>(mean),
                                           ws.copy<double>(invstd), "batch_norm_forward_apply");
}

template <class T>
void batch_norm_forward_from_moments(ConstTensorView<T> x, TensorView<T> y,
                                     std::span<const T> gamma, std::span<const T> beta,
                                     std::span<const Moments> moments, SavedStats<T> saved,
                                     RunningStats<T> running, const BatchNormOptions& options) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  check_in_place(y.data, gy, x.data, gx, "x");
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(beta, gx.channels, "bias (beta)", kPerChannel, false);
  check_statistics_from_moments(moments, gx.channels, saved, running, options);

  Workspace ws;
  const std::span<double> mean = ws.take_for_overwrite<double>(gx.channels),
                          invstd = ws.take_for_overwrite<double>(gx.channels);
  for (int64_t c = 0; c < gx.channels; ++c) {
    mean[c] = moments[c].mean;
    invstd[c] = bn::invstd_of(moments[c].biased_variance(), options.eps);
  }
  detail::batch_norm_apply_double_stats<T>(x, y, gamma, beta, mean, invstd,
                                           "batch_norm_forward_from_moments");
  detail::write_saved(moments, saved, options.eps);
  batch_norm_update_running<T>(moments, running, options);
}

template <class T>
void batch_norm_statistics_from_moments(std::span<const Moments> moments, SavedStats<T> saved,
                                        RunningStats<T> running, const BatchNormOptions& options) {
  const auto channels = static_cast<int64_t>(moments.size());
  if (channels < 1) fail_invalid("moments: expected at least one channel");
  check_statistics_from_moments(moments, channels, saved, running, options);
  detail::write_saved(moments, saved, options.eps);
  batch_norm_update_running<T>(moments, running, options);
}

template <class T>
void batch_norm_forward_inference(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                                  std::span<const T> beta, std::span<const T> running_mean,
                                  std::span<const T> running_var, double eps) {
  check_eps(eps);
  const Geometry gx = checked_input(x, "x");
  check_count(running_mean, gx.channels, "running_mean", kPerChannel, true);
  check_count(running_var, gx.channels, "running_var", kPerChannel, true);
  Workspace ws;
  const std::span<double> invstd = ws.take_for_overwrite<double>(running_var.size());
  detail::checked_inference_invstd<T>(running_var, eps, "running_var", invstd);
  detail::batch_norm_apply_double_stats<T>(x, y, gamma, beta, ws.copy<double>(running_mean),
                                           invstd, "batch_norm_forward_inference");
}

template <class T>
void batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                         std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta,
                         BackwardMode mode) {
  const auto [gx, gdy, gdx] = checked_gradients<T>(x, dy, dx);
  if (mode != BackwardMode::training && mode != BackwardMode::frozen)
    fail_invalid("mode: unknown backward mode");
  if (mode == BackwardMode::training) check_training_size(gx, x);
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(mean, gx.channels, "mean", kPerChannel, true);
  check_count(invstd, gx.channels, "invstd", kPerChannel, true);
  check_count(dgamma, gx.channels, "dgamma", kPerChannel, false);
  check_count(dbeta, gx.channels, "dbeta", kPerChannel, false);

  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  const std::span<double> sum_dy = ws.take<double>(gx.channels),
                          sum_dy_xhat = ws.take<double>(gx.channels);
  const bn::Backward<T> problem{gx,     gdy,           gdx,            x.data, dy.data,
                                dx.data, or_null(gamma), mean_d.data(), invstd_d.data(), mode,
                                sum_dy.data(), sum_dy_xhat.data()};
  detail::run("batch_norm_backward", bn::implementations(), &bn::Impl::backward,
              bn::ref::backward<T>, problem, gx, std::array{gdy, gdx});
  for (int64_t c = 0; c < gx.channels; ++c) {
    if (!dgamma.empty()) dgamma[c] = static_cast<T>(sum_dy_xhat[c]);
    if (!dbeta.empty()) dbeta[c] = static_cast<T>(sum_dy[c]);
  }
}

template <class T>
void batch_norm_backward_reduce(ConstTensorView<T> x, ConstTensorView<T> dy,
                                std::span<const T> mean, std::span<const T> invstd,
                                std::span<double> sum_dy, std::span<double> sum_dy_xhat) {
  const auto [gx, gdy, gdx] = checked_gradients<T>(x, dy, TensorView<T>{});
  check_count(mean, gx.channels, "mean", kPerChannel, true);
  check_count(invstd, gx.channels, "invstd", kPerChannel, true);
  check_count(sum_dy, gx.channels, "sum_dy", kPerChannel, true);
  check_count(sum_dy_xhat, gx.channels, "sum_dy_xhat", kPerChannel, true);
  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  // Backward without dx computes exactly these sums.
  const bn::Backward<T> problem{gx,      gdy,     gdx,           x.data,          dy.data,
                                nullptr, nullptr, mean_d.data(), invstd_d.data(),
                                BackwardMode::training, sum_dy.data(), sum_dy_xhat.data()};
  detail::run("batch_norm_backward_reduce", bn::implementations(), &bn::Impl::backward,
              bn::ref::backward<T>, problem, gx, std::array{gdy});
}

template <class T>
void batch_norm_backward_apply(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                               std::span<const T> gamma, std::span<const T> mean,
                               std::span<const T> invstd, std::span<const double> sum_dy,
                               std::span<const double> sum_dy_xhat, double count) {
  if (!dx.data) fail_invalid("dx: data pointer is null");
  const auto [gx, gdy, gdx] = checked_gradients<T>(x, dy, dx);
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(mean, gx.channels, "mean", kPerChannel, true);
  check_count(invstd, gx.channels, "invstd", kPerChannel, true);
  check_count(sum_dy, gx.channels, "sum_dy", kPerChannel, true);
  check_count(sum_dy_xhat, gx.channels, "sum_dy_xhat", kPerChannel, true);
  if (!(count > 1) || !std::isfinite(count) || count < static_cast<double>(gx.reduction_size()))
    fail_invalid("count (values per channel in the whole batch) must be above 1 and at least x's ",
                 gx.reduction_size(), ", got ", count);
  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  const bn::BackwardApply<T> problem{gx,            gdy,            gdx,
                                     x.data,        dy.data,        dx.data,
                                     or_null(gamma), mean_d.data(), invstd_d.data(),
                                     sum_dy.data(), sum_dy_xhat.data(), count};
  detail::run("batch_norm_backward_apply", bn::implementations(), &bn::Impl::backward_apply,
              bn::ref::backward_apply<T>, problem, gx, std::array{gdy, gdx});
}

template <class T>
void batch_norm_moments(ConstTensorView<T> x, std::span<Moments> moments) {
  const Geometry gx = checked_input(x, "x");
  check_count(moments, gx.channels, "moments", kPerChannel, true);
  detail::run("batch_norm_moments", bn::implementations(), &bn::Impl::moments,
              bn::ref::moments<T>, bn::Statistics<T>{gx, x.data, moments.data()}, gx,
              std::span<const Geometry>());
}

template <class T>
void batch_norm_invstd(std::span<const T> var, double eps, std::span<T> invstd) {
  check_eps(eps);
  if (invstd.size() != var.size())
    fail_invalid("invstd should contain ", var.size(), " elements not ", invstd.size());
  Workspace ws;
  const std::span<double> wide = ws.take_for_overwrite<double>(var.size());
  detail::checked_inference_invstd<T>(var, eps, "var", wide);
  std::copy(wide.begin(), wide.end(), invstd.begin());  // values of T: exact
}

#define NORMKIT_INSTANTIATE(T)                                                                   \
  template void batch_norm_forward_training<T>(ConstTensorView<T>, TensorView<T>,              \
                                               std::span<const T>, std::span<const T>,          \
                                               SavedStats<T>, RunningStats<T>,                  \
                                               const BatchNormOptions&);                        \
  template void batch_norm_forward_inference<T>(ConstTensorView<T>, TensorView<T>,             \
                                                std::span<const T>, std::span<const T>,         \
                                                std::span<const T>, std::span<const T>, double); \
  template void batch_norm_backward<T>(ConstTensorView<T>, ConstTensorView<T>, TensorView<T>,  \
                                       std::span<const T>, std::span<const T>,                  \
                                       std::span<const T>, std::span<T>, std::span<T>,          \
                                       BackwardMode);                                           \
  template void batch_norm_moments<T>(ConstTensorView<T>, std::span<Moments>);                  \
  template void batch_norm_forward_apply<T>(ConstTensorView<T>, TensorView<T>,                 \
                                            std::span<const T>, std::span<const T>,             \
                                            std::span<const T>, std::span<const T>);            \
  template void batch_norm_update_running<T>(std::span<const Moments>, RunningStats<T>,         \
                                             const BatchNormOptions&);                          \
  template void batch_norm_invstd<T>(std::span<const T>, double, std::span<T>);              \
  template void batch_norm_forward_from_moments<T>(                                             \
      ConstTensorView<T>, TensorView<T>, std::span<const T>, std::span<const T>,                \
      std::span<const Moments>, SavedStats<T>, RunningStats<T>, const BatchNormOptions&);       \
  template void batch_norm_statistics_from_moments<T>(std::span<const Moments>, SavedStats<T>,   \
                                                     RunningStats<T>, const BatchNormOptions&); \
  template void batch_norm_backward_reduce<T>(ConstTensorView<T>, ConstTensorView<T>,           \
                                              std::span<const T>, std::span<const T>,           \
                                              std::span<double>, std::span<double>);            \
  template void batch_norm_backward_apply<T>(ConstTensorView<T>, ConstTensorView<T>,            \
                                             TensorView<T>, std::span<const T>,                 \
                                             std::span<const T>, std::span<const T>,            \
                                             std::span<const double>, std::span<const double>,  \
                                             double);

NORMKIT_INSTANTIATE(float)
NORMKIT_INSTANTIATE(double)

// forward_apply with double statistics (batch_norm_internal.hpp).
template <class T>
void detail::batch_norm_apply_double_stats(ConstTensorView<T> x, TensorView<T> y,
                                           std::span<const T> gamma, std::span<const T> beta,
                                           std::span<const double> mean,
                                           std::span<const double> invstd, const char* op) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  check_in_place(y.data, gy, x.data, gx, "x");
  unify<T>(x, gx, {{&gy, y}});
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(beta, gx.channels, "bias (beta)", kPerChannel, false);
  check_count(mean, gx.channels, "mean", kPerChannel, true);
  check_count(invstd, gx.channels, "invstd", kPerChannel, true);
  const bn::Apply<T> problem{gx,           gy,          x.data,      y.data,
                             or_null(gamma), or_null(beta), mean.data(), invstd.data()};
  detail::run(op, bn::implementations(), &bn::Impl::apply, bn::ref::apply<T>, problem, gx,
              std::array{gy});
}
template void detail::batch_norm_apply_double_stats<float>(
    ConstTensorView<float>, TensorView<float>, std::span<const float>, std::span<const float>,
    std::span<const double>, std::span<const double>, const char*);
template void detail::batch_norm_apply_double_stats<double>(
    ConstTensorView<double>, TensorView<double>, std::span<const double>, std::span<const double>,
    std::span<const double>, std::span<const double>, const char*);

}  // namespace normkit
