// The public batch-normalization functions: check every argument, pick an
// implementation, and own the running statistics. Nothing is written before
// all checks have passed, and running statistics are updated only after the
// batch statistics are known to be finite.
#include "normkit/batch_norm.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "batch_norm_internal.hpp"
#include "batch_norm_kernels.hpp"
#include "core/check.hpp"
#include "core/norm_checks.hpp"

namespace normkit {

using detail::check_eps;
using detail::check_per_channel;
using detail::check_running;
using detail::checked_input;
using detail::fail_invalid;
using detail::fail_runtime;
using detail::unify;
using detail::verbose;

namespace {

template <class T, class U>
Geometry checked_like(const TensorView<U>& view, ConstTensorView<T> x, const char* name) {
  if (view.layout != x.layout || view.shape != x.shape) {
    // Compare only the used extent of the shape.
    bool same = view.rank() == x.rank();
    for (int axis = 0; same && axis < x.rank(); ++axis) same = view.shape[axis] == x.shape[axis];
    if (!same || view.layout != x.layout)
      fail_invalid(name, ": shape ", view.shape_string(), " does not match x's ",
                   x.shape_string());
  }
  if (!view.data) fail_invalid(name, ": data pointer is null");
  return geometry_of(view, name);
}

template <class T>
void check_training_size(const Geometry& g, ConstTensorView<T> x) {
  if (g.reduction_size() <= 1)
    fail_invalid("expected more than 1 value per channel when training, got input size ",
                 x.shape_string());
}

template <class T>
void check_finite(std::span<const Moments> moments) {
  for (size_t c = 0; c < moments.size(); ++c)
    if (!std::isfinite(moments[c].mean) || !std::isfinite(moments[c].m2))
      fail_runtime("x: channel ", c,
                   " contains NaN or infinite values; running statistics left unchanged");
}

// The first fast implementation that accepts all geometries, or nullptr for the reference.
template <class T>
const kernels::Implementation* choose(const char* op, const Geometry& x,
                                      std::initializer_list<Geometry> others) {
  if constexpr (!std::is_same_v<T, float>) {
    if (verbose()) std::fprintf(stderr, "normkit: %s: double data, reference\n", op);
    return nullptr;
  } else {
    const std::span<const Geometry> rest(others.begin(), others.size());
    for (const auto& impl : kernels::cpu_implementations()) {
      const char* reason = impl.decline(x, rest);
      if (!reason) {
        if (verbose()) std::fprintf(stderr, "normkit: %s: %s\n", op, impl.name);
        return &impl;
      }
      if (verbose()) std::fprintf(stderr, "normkit: %s: %s declined: %s\n", op, impl.name, reason);
    }
    if (verbose()) std::fprintf(stderr, "normkit: %s: reference\n", op);
    return nullptr;
  }
}

// The end of forward-training once the batch's moments are known to be finite:
// saved mean and invstd, running statistics.
template <class T>
void save_and_track(std::span<const Moments> moments, SavedStats<T> saved, RunningStats<T> running,
                    const BatchNormOptions& options) {
  // Separate loops without branches: with thousands of channels (32×4096),
  // these vectorize and cost a fraction of what per-channel scalar code does.
  const auto channels = static_cast<int64_t>(moments.size());
  if (!saved.mean.empty())
    for (int64_t c = 0; c < channels; ++c) saved.mean[c] = static_cast<T>(moments[c].mean);
  if (!saved.invstd.empty())
    for (int64_t c = 0; c < channels; ++c)
      saved.invstd[c] = static_cast<T>(kernels::invstd_of(moments[c].biased_variance(), options.eps));
  batch_norm_update_running<T>(moments, running, options);
}

// x, dy and dx (data == nullptr: not wanted) of a backward: checked, with their
// in-place rules, as one set of geometries the kernels can walk together.
struct GradientGeometries {
  Geometry x, dy, dx;
};
template <class T>
GradientGeometries checked_gradients(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx) {
  Geometry gx = checked_input(x, "x");
  Geometry gdy = checked_like(dy, x, "dy");
  Geometry gdx = dx.data ? checked_like(dx, x, "dx") : gdy;
  if (dx.data && (dx.data == x.data || dx.data == dy.data) &&
      !(gdx == gx && (dx.data != dy.data || gdx == gdy)))
    fail_invalid("dx: in-place output must have the same strides as its input");
  if (dx.data)
    unify<T>(x, gx, {{&gdy, dy}, {&gdx, dx}});
  else
    unify<T>(x, gx, {{&gdy, dy}});
  if (!dx.data) gdx = gdy;
  return {gx, gdy, gdx};
}

}  // namespace

template <class T>
void batch_norm_update_running(std::span<const Moments> moments, RunningStats<T> running,
                               const BatchNormOptions& options) {
  const auto channels = static_cast<int64_t>(moments.size());
  check_running(running, channels, options);
  if (running.mean.empty()) {
    if (running.num_batches_tracked) ++*running.num_batches_tracked;
    return;
  }
  for (const auto& m : moments)
    if (m.count < 2) fail_invalid("expected more than 1 value per channel when training");
  check_finite<T>(moments);

  int64_t batches = 0;
  if (running.num_batches_tracked) batches = ++*running.num_batches_tracked;
  const double momentum = options.momentum ? *options.momentum : 1.0 / static_cast<double>(batches);
  // weight_on_new: running = (1 - m)·running + m·batch;  weight_on_old: m·running + (1 - m)·batch.
  const double w_new =
      options.momentum_convention == MomentumConvention::weight_on_new || !options.momentum
          ? momentum
          : 1.0 - momentum;
  const bool unbiased = options.running_variance == RunningVariance::unbiased;
  for (int64_t c = 0; c < channels; ++c) {
    const double var = unbiased ? moments[c].unbiased_variance() : moments[c].biased_variance();
    running.mean[c] = static_cast<T>((1.0 - w_new) * running.mean[c] + w_new * moments[c].mean);
    running.var[c] = static_cast<T>((1.0 - w_new) * running.var[c] + w_new * var);
  }
}

template <class T>
void batch_norm_forward_training(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                                 std::span<const T> beta, SavedStats<T> saved,
                                 RunningStats<T> running, const BatchNormOptions& options) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  if (y.data == x.data && !(gx == gy))
    fail_invalid("y: in-place output must have the same strides as x");
  unify<T>(x, gx, {{&gy, y}});
  check_training_size(gx, x);
  check_per_channel(gamma, gx.channels, "weight (gamma)", false);
  check_per_channel(beta, gx.channels, "bias (beta)", false);
  check_per_channel(saved.mean, gx.channels, "save_mean", false);
  check_per_channel(saved.invstd, gx.channels, "save_invstd", false);
  check_running(running, gx.channels, options);

  std::vector<Moments> moments(gx.channels);
  kernels::ForwardTraining<T> problem{gx,
                                      gy,
                                      x.data,
                                      y.data,
                                      gamma.empty() ? nullptr : gamma.data(),
                                      beta.empty() ? nullptr : beta.data(),
                                      options.eps,
                                      moments.data()};
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_forward_training", gx, {gy}))
      impl->forward_training(problem);
    else
      kernels::ref::forward_training(problem);
  } else {
    kernels::ref::forward_training(problem);
  }
  check_finite<T>(moments);
  save_and_track<T>(moments, saved, running, options);
}

template <class T>
void batch_norm_forward_from_moments(ConstTensorView<T> x, TensorView<T> y,
                                     std::span<const T> gamma, std::span<const T> beta,
                                     std::span<const Moments> moments, SavedStats<T> saved,
                                     RunningStats<T> running, const BatchNormOptions& options) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  if (y.data == x.data && !(gx == gy))
    fail_invalid("y: in-place output must have the same strides as x");
  unify<T>(x, gx, {{&gy, y}});
  check_per_channel(gamma, gx.channels, "weight (gamma)", false);
  check_per_channel(beta, gx.channels, "bias (beta)", false);
  check_per_channel(moments, gx.channels, "moments", true);
  check_per_channel(saved.mean, gx.channels, "save_mean", false);
  check_per_channel(saved.invstd, gx.channels, "save_invstd", false);
  check_running(running, gx.channels, options);
  for (size_t c = 0; c < moments.size(); ++c)
    if (!(moments[c].count > 1))
      fail_invalid("expected more than 1 value per channel when training, got moments of ",
                   moments[c].count, " values for channel ", c);
  check_finite<T>(moments);

  std::vector<double> mean(gx.channels), invstd(gx.channels);
  for (int64_t c = 0; c < gx.channels; ++c) {
    mean[c] = moments[c].mean;
    invstd[c] = kernels::invstd_of(moments[c].biased_variance(), options.eps);
  }
  detail::batch_norm_apply_double_stats<T>(x, y, gamma, beta, mean, invstd);
  save_and_track<T>(moments, saved, running, options);
}

template <class T>
void batch_norm_forward_apply(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                              std::span<const T> beta, std::span<const T> mean,
                              std::span<const T> invstd) {
  const std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());
  detail::batch_norm_apply_double_stats<T>(x, y, gamma, beta, mean_d, invstd_d);
}

template <class T>
void batch_norm_forward_inference(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                                  std::span<const T> beta, std::span<const T> running_mean,
                                  std::span<const T> running_var, double eps) {
  check_eps(eps);
  const Geometry gx = checked_input(x, "x");
  check_per_channel(running_mean, gx.channels, "running_mean", true);
  check_per_channel(running_var, gx.channels, "running_var", true);
  for (size_t c = 0; c < running_var.size(); ++c)
    if (!(running_var[c] + eps > 0))
      fail_invalid("running_var[", c, "] + eps must be positive, got ", running_var[c]);
  std::vector<T> invstd(running_var.size());
  for (size_t c = 0; c < running_var.size(); ++c)
    invstd[c] = static_cast<T>(kernels::invstd_of(running_var[c], eps));
  batch_norm_forward_apply<T>(x, y, gamma, beta, running_mean, invstd);
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
  check_per_channel(gamma, gx.channels, "weight (gamma)", false);
  check_per_channel(mean, gx.channels, "mean", true);
  check_per_channel(invstd, gx.channels, "invstd", true);
  check_per_channel(dgamma, gx.channels, "dgamma", false);
  check_per_channel(dbeta, gx.channels, "dbeta", false);

  std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());
  std::vector<double> sum_dy(gx.channels), sum_dy_xhat(gx.channels);
  kernels::Backward<T> problem{gx,           gdy,           gdx,  x.data, dy.data,
                               dx.data,      gamma.empty() ? nullptr : gamma.data(),
                               mean_d.data(), invstd_d.data(), mode,  sum_dy.data(),
                               sum_dy_xhat.data()};
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_backward", gx, {gdy, gdx})) {
      impl->backward(problem);
      done = true;
    }
  }
  if (!done) kernels::ref::backward(problem);
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
  check_per_channel(mean, gx.channels, "mean", true);
  check_per_channel(invstd, gx.channels, "invstd", true);
  check_per_channel(sum_dy, gx.channels, "sum_dy", true);
  check_per_channel(sum_dy_xhat, gx.channels, "sum_dy_xhat", true);
  std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());
  // Backward without dx computes exactly these sums.
  kernels::Backward<T> problem{gx,      gdy,           gdx,           x.data,
                               dy.data, nullptr,       nullptr,       mean_d.data(),
                               invstd_d.data(), BackwardMode::training, sum_dy.data(),
                               sum_dy_xhat.data()};
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_backward_reduce", gx, {gdy}))
      return impl->backward(problem);
  }
  kernels::ref::backward(problem);
}

template <class T>
void batch_norm_backward_apply(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                               std::span<const T> gamma, std::span<const T> mean,
                               std::span<const T> invstd, std::span<const double> sum_dy,
                               std::span<const double> sum_dy_xhat, double count) {
  if (!dx.data) fail_invalid("dx: data pointer is null");
  const auto [gx, gdy, gdx] = checked_gradients<T>(x, dy, dx);
  check_per_channel(gamma, gx.channels, "weight (gamma)", false);
  check_per_channel(mean, gx.channels, "mean", true);
  check_per_channel(invstd, gx.channels, "invstd", true);
  check_per_channel(sum_dy, gx.channels, "sum_dy", true);
  check_per_channel(sum_dy_xhat, gx.channels, "sum_dy_xhat", true);
  if (!(count > 1) || !std::isfinite(count) ||
      count < static_cast<double>(gx.reduction_size()))
    fail_invalid("count (values per channel in the whole batch) must be above 1 and at least x's ",
                 gx.reduction_size(), ", got ", count);
  std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());
  kernels::BackwardApply<T> problem{gx,           gdy,           gdx,
                                    x.data,       dy.data,       dx.data,
                                    gamma.empty() ? nullptr : gamma.data(),
                                    mean_d.data(), invstd_d.data(), sum_dy.data(),
                                    sum_dy_xhat.data(), count};
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_backward_apply", gx, {gdy, gdx}))
      return impl->backward_apply(problem);
  }
  kernels::ref::backward_apply(problem);
}

template <class T>
void batch_norm_moments(ConstTensorView<T> x, std::span<Moments> moments) {
  const Geometry gx = checked_input(x, "x");
  check_per_channel(moments, gx.channels, "moments", true);
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_moments", gx, {}))
      return impl->moments(gx, x.data, moments.data());
  }
  kernels::ref::moments(gx, x.data, moments.data());
}

template <class T>
void batch_norm_invstd(std::span<const T> var, double eps, std::span<T> invstd) {
  check_eps(eps);
  if (invstd.size() != var.size())
    fail_invalid("invstd should contain ", var.size(), " elements not ", invstd.size());
  for (size_t c = 0; c < var.size(); ++c) {
    if (!(var[c] + eps > 0))
      fail_invalid("var[", c, "] + eps must be positive, got ", var[c]);
  }
  for (size_t c = 0; c < var.size(); ++c) invstd[c] = static_cast<T>(kernels::invstd_of(var[c], eps));
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

// For the BN variants (batch_norm_internal.hpp): forward_apply with double statistics.
template <class T>
void detail::batch_norm_apply_double_stats(ConstTensorView<T> x, TensorView<T> y,
                                           std::span<const T> gamma, std::span<const T> beta,
                                           std::span<const double> mean,
                                           std::span<const double> invstd) {
  Geometry gx = checked_input(x, "x");
  Geometry gy = checked_like(y, x, "y");
  if (y.data == x.data && !(gx == gy))
    fail_invalid("y: in-place output must have the same strides as x");
  unify<T>(x, gx, {{&gy, y}});
  check_per_channel(gamma, gx.channels, "weight (gamma)", false);
  check_per_channel(beta, gx.channels, "bias (beta)", false);
  check_per_channel(mean, gx.channels, "mean", true);
  check_per_channel(invstd, gx.channels, "invstd", true);
  kernels::Apply<T> problem{gx,
                            gy,
                            x.data,
                            y.data,
                            gamma.empty() ? nullptr : gamma.data(),
                            beta.empty() ? nullptr : beta.data(),
                            mean.data(),
                            invstd.data()};
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose<T>("batch_norm_apply_double_stats", gx, {gy}))
      return impl->apply(problem);
  }
  kernels::ref::apply(problem);
}
template void detail::batch_norm_apply_double_stats<float>(ConstTensorView<float>, TensorView<float>,
                                                           std::span<const float>, std::span<const float>,
                                                           std::span<const double>, std::span<const double>);
template void detail::batch_norm_apply_double_stats<double>(ConstTensorView<double>, TensorView<double>,
                                                            std::span<const double>, std::span<const double>,
                                                            std::span<const double>, std::span<const double>);

}  // namespace normkit
