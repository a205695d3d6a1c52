// The public group- and instance-normalization functions: check every
// argument, view the tensors as [N, C, S], pick an implementation, and own
// instance norm's running statistics. Nothing is written before all checks
// have passed.
#include "normkit/group_norm.hpp"

#include <array>
#include <cmath>
#include <span>

#include "core/check.hpp"
#include "core/dispatch.hpp"
#include "core/norm_checks.hpp"
#include "core/sample_geometry.hpp"
#include "kernels/group_norm.hpp"
#include "ops/batch_norm_internal.hpp"

namespace normkit {

using detail::check_count;
using detail::check_eps;
using detail::check_in_place;
using detail::check_in_place_dx;
using detail::check_running;
using detail::checked_input;
using detail::checked_like;
using detail::fail_invalid;
using detail::kPerChannel;
using detail::or_null;
using detail::Workspace;
namespace gn = kernels::gn;

namespace {

constexpr const char* kPerSampleAndGroup = "one per sample and group";

template <class T>
void check_groups(int64_t groups, ConstTensorView<T> x, int64_t channels) {
  if (groups < 1) fail_invalid("num_groups must be positive, got ", groups);
  if (channels % groups != 0)
    fail_invalid("expected the number of channels to be divisible by num_groups, but got input "
                 "of shape ", x.shape_string(), " (", channels, " channels) and num_groups=",
                 groups);
}

// Runs the problem; returns its moments (N·G), taken from ws.
template <class T>
std::span<Moments> run_forward(ConstTensorView<T> x, TensorView<T> y, int64_t groups,
                               std::span<const T> gamma, std::span<const T> beta, double eps,
                               Workspace& ws, const char* op) {
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  const SampleGeometry gy = checked_like<SampleGeometry>(y, x, "y");
  check_in_place(y.data, gy, x.data, gx, "x");
  check_groups(groups, x, gx.c);
  check_count(gamma, gx.c, "weight (gamma)", kPerChannel, false);
  check_count(beta, gx.c, "bias (beta)", kPerChannel, false);
  check_eps(eps);
  const std::span<Moments> moments = ws.take<Moments>(static_cast<size_t>(gx.n * groups));
  const gn::Forward<T> problem{gx,     gy,     x.data, y.data,        or_null(gamma),
                               or_null(beta), groups, eps,    moments.data()};
  detail::run(op, gn::implementations(), &gn::Impl::forward, gn::ref::forward<T>, problem, gx,
              std::array{gy});
  return moments;
}

}  // namespace

template <class T>
void group_norm_forward(ConstTensorView<T> x, TensorView<T> y, int64_t num_groups,
                        std::span<const T> gamma, std::span<const T> beta, SavedStats<T> saved,
                        double eps) {
  // Sizes of the saved statistics depend on N and G: checked before run_forward writes y.
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  check_groups(num_groups, x, gx.c);
  check_count(saved.mean, gx.n * num_groups, "save_mean", kPerSampleAndGroup, false);
  check_count(saved.invstd, gx.n * num_groups, "save_invstd", kPerSampleAndGroup, false);
  Workspace ws;
  const std::span<Moments> moments =
      run_forward(x, y, num_groups, gamma, beta, eps, ws, "group_norm_forward");
  detail::write_saved(moments, saved, eps);
}

template <class T>
void group_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                         int64_t num_groups, std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta) {
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  const SampleGeometry gdy = checked_like<SampleGeometry>(dy, x, "dy");
  const SampleGeometry gdx = dx.data ? checked_like<SampleGeometry>(dx, x, "dx") : gdy;
  check_in_place_dx(dx.data, gdx, x.data, gx, dy.data, gdy);
  check_groups(num_groups, x, gx.c);
  check_count(gamma, gx.c, "weight (gamma)", kPerChannel, false);
  check_count(mean, gx.n * num_groups, "mean", kPerSampleAndGroup, true);
  check_count(invstd, gx.n * num_groups, "invstd", kPerSampleAndGroup, true);
  check_count(dgamma, gx.c, "dgamma", kPerChannel, false);
  check_count(dbeta, gx.c, "dbeta", kPerChannel, false);

  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  const std::span<double> dgamma_d = ws.take<double>(gx.c), dbeta_d = ws.take<double>(gx.c);
  const gn::Backward<T> problem{gx,      gdy,           gdx,           x.data,
                                dy.data, dx.data,       or_null(gamma), num_groups,
                                mean_d.data(), invstd_d.data(), dgamma_d.data(), dbeta_d.data()};
  detail::run("group_norm_backward", gn::implementations(), &gn::Impl::backward,
              gn::ref::backward<T>, problem, gx, std::array{gdy, gdx});
  for (int64_t c = 0; c < gx.c; ++c) {
    if (!dgamma.empty()) dgamma[c] = static_cast<T>(dgamma_d[c]);
    if (!dbeta.empty()) dbeta[c] = static_cast<T>(dbeta_d[c]);
  }
}

template <class T>
void group_norm_moments(ConstTensorView<T> x, int64_t num_groups, std::span<Moments> moments) {
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  check_groups(num_groups, x, gx.c);
  check_count(moments, gx.n * num_groups, "moments", kPerSampleAndGroup, true);
  detail::run("group_norm_moments", gn::implementations(), &gn::Impl::moments,
              gn::ref::moments<T>, gn::Statistics<T>{gx, x.data, num_groups, moments.data()}, gx,
              std::span<const SampleGeometry>());
}

template <class T>
void instance_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                    std::span<const T> gamma, std::span<const T> beta,
                                    SavedStats<T> saved, RunningStats<T> running,
                                    const BatchNormOptions& options) {
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  if (gx.s <= 1)
    fail_invalid("expected more than 1 spatial element when training, got input size ",
                 x.shape_string());
  check_count(saved.mean, gx.n * gx.c, "save_mean", "one per sample and channel", false);
  check_count(saved.invstd, gx.n * gx.c, "save_invstd", "one per sample and channel", false);
  check_running(running, gx.c, options);

  Workspace ws;
  const std::span<Moments> moments =
      run_forward(x, y, gx.c, gamma, beta, options.eps, ws, "instance_norm_forward_training");

  // The batch value of a channel is the average over samples of the instance
  // mean and of the instance unbiased variance (PyTorch's instance_norm
  // averages the N running statistics it updated). As one Moments per channel
  // with count S: unbiased_variance() = m2 / (S - 1) is that average, and
  // biased_variance() = m2 / S its biased counterpart (Keras' convention).
  if (!running.mean.empty() || running.num_batches_tracked) {
    const double s = static_cast<double>(gx.s);
    const std::span<Moments> per_channel = ws.take<Moments>(static_cast<size_t>(gx.c));
    for (int64_t c = 0; c < gx.c; ++c) {
      double mean = 0, var = 0;
      for (int64_t n = 0; n < gx.n; ++n) {
        mean += moments[n * gx.c + c].mean;
        var += moments[n * gx.c + c].unbiased_variance();
      }
      mean /= static_cast<double>(gx.n);
      var /= static_cast<double>(gx.n);
      per_channel[c] = {s, mean, var * (s - 1)};
    }
    // Raises (running statistics and counter unchanged) when a statistic is NaN or infinite.
    batch_norm_update_running<T>(per_channel, running, options);
  }
  detail::write_saved(moments, saved, options.eps);
}

template <class T>
void instance_norm_forward_inference(ConstTensorView<T> x, TensorView<T> y,
                                     std::span<const T> gamma, std::span<const T> beta,
                                     std::span<const T> running_mean,
                                     std::span<const T> running_var, double eps) {
  batch_norm_forward_inference<T>(x, y, gamma, beta, running_mean, running_var, eps);
}

template <class T>
void instance_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                            std::span<const T> gamma, std::span<const T> mean,
                            std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta) {
  const SampleGeometry gx = checked_input<SampleGeometry>(x, "x");
  group_norm_backward<T>(x, dy, dx, gx.c, gamma, mean, invstd, dgamma, dbeta);
}

#define NORMKIT_INSTANTIATE_GN(T)                                                               \
  template void group_norm_forward<T>(ConstTensorView<T>, TensorView<T>, int64_t,              \
                                      std::span<const T>, std::span<const T>, SavedStats<T>,   \
                                      double);                                                 \
  template void group_norm_backward<T>(ConstTensorView<T>, ConstTensorView<T>, TensorView<T>,  \
                                       int64_t, std::span<const T>, std::span<const T>,        \
                                       std::span<const T>, std::span<T>, std::span<T>);        \
  template void group_norm_moments<T>(ConstTensorView<T>, int64_t, std::span<Moments>);        \
  template void instance_norm_forward_training<T>(ConstTensorView<T>, TensorView<T>,           \
                                                  std::span<const T>, std::span<const T>,      \
                                                  SavedStats<T>, RunningStats<T>,              \
                                                  const BatchNormOptions&);                    \
  template void instance_norm_forward_inference<T>(ConstTensorView<T>, TensorView<T>,          \
                                                   std::span<const T>, std::span<const T>,     \
                                                   std::span<const T>, std::span<const T>,     \
                                                   double);                                    \
  template void instance_norm_backward<T>(ConstTensorView<T>, ConstTensorView<T>,              \
                                          TensorView<T>, std::span<const T>,                   \
                                          std::span<const T>, std::span<const T>,              \
                                          std::span<T>, std::span<T>);

NORMKIT_INSTANTIATE_GN(float)
NORMKIT_INSTANTIATE_GN(double)

}  // namespace normkit
