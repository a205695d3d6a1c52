// The public group- and instance-normalization functions: check every
// argument, view the tensors as [N, C, S], pick an implementation, and own
// instance norm's running statistics. Nothing is written before all checks
// have passed.
#include "normkit/group_norm.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "core/check.hpp"
#include "core/norm_checks.hpp"
#include "kernels/group_norm.hpp"

namespace normkit {

using detail::check_eps;
using detail::check_running;
using detail::fail_invalid;
using detail::verbose;
using kernels::gn::SampleGeometry;

namespace {

// [N, C, S]: the spatial axes (all but N and C) must collapse into one evenly
// strided run; N and C keep their own strides, so batch slices and padded
// rows work in either layout.
template <class T>
SampleGeometry sample_geometry(const TensorView<T>& v, const char* name) {
  const int code = static_cast<int>(v.layout);
  if (code < static_cast<int>(Layout::NC) || code > static_cast<int>(Layout::NDHWC))
    fail_invalid(name, ": unsupported layout value");
  const int rank = v.rank();
  for (int axis = 0; axis < rank; ++axis) {
    if (v.shape[axis] < 0) fail_invalid(name, ": negative size in shape ", v.shape_string());
    if (v.strides[axis] < 0)
      fail_invalid(name, ": negative strides are not supported (shape ", v.shape_string(), ")");
  }
  const int c_axis = channel_axis(v.layout);
  const int first = is_channels_last(v.layout) ? 1 : 2;
  const int last = is_channels_last(v.layout) ? rank - 1 : rank;  // spatial axes [first, last)
  SampleGeometry g;
  g.n = v.shape[0];
  g.c = v.shape[c_axis];
  g.n_stride = v.strides[0];
  g.c_stride = v.strides[c_axis];
  g.s = 1;
  g.s_stride = 1;
  bool have_stride = false;
  for (int axis = last - 1; axis >= first; --axis) {
    const int64_t size = v.shape[axis];
    if (size == 1) continue;
    if (size == 0) {
      g.s = 0;
      break;
    }
    if (!have_stride) {
      g.s_stride = v.strides[axis];
      have_stride = true;
    } else if (v.strides[axis] != g.s_stride * g.s) {
      fail_invalid(name, ": the strides of ", v.shape_string(),
                   " do not let the spatial axes be viewed as one; pass a contiguous tensor");
    }
    g.s *= size;
  }
  return g;
}

template <class T>
SampleGeometry checked_input(ConstTensorView<T> x, const char* name) {
  const SampleGeometry g = sample_geometry(x, name);
  if (x.numel() == 0) fail_invalid(name, ": empty tensor ", x.shape_string());
  if (!x.data) fail_invalid(name, ": data pointer is null");
  return g;
}

template <class T, class U>
SampleGeometry checked_like(const TensorView<U>& view, ConstTensorView<T> x, const char* name) {
  bool same = view.layout == x.layout;
  for (int axis = 0; same && axis < x.rank(); ++axis) same = view.shape[axis] == x.shape[axis];
  if (!same)
    fail_invalid(name, ": shape ", view.shape_string(), " does not match x's ", x.shape_string());
  if (!view.data) fail_invalid(name, ": data pointer is null");
  return sample_geometry(view, name);
}

template <class T>
void check_size(std::span<T> values, int64_t expected, const char* name, const char* what,
                bool required) {
  if (values.empty() && !required) return;
  if (static_cast<int64_t>(values.size()) != expected)
    fail_invalid(name, " should contain ", expected, " elements (", what, ") not ", values.size());
}

template <class T>
void check_groups(int64_t groups, ConstTensorView<T> x, int64_t channels) {
  if (groups < 1) fail_invalid("num_groups must be positive, got ", groups);
  if (channels % groups != 0)
    fail_invalid("expected the number of channels to be divisible by num_groups, but got input "
                 "of shape ", x.shape_string(), " (", channels, " channels) and num_groups=",
                 groups);
}

// The first fast implementation that accepts all geometries, or nullptr (the reference).
const kernels::gn::Implementation* choose(const char* op, const SampleGeometry& x,
                                          std::initializer_list<SampleGeometry> others) {
  int count = 0;
  const auto* impls = kernels::gn::cpu_implementations(&count);
  for (int i = 0; i < count; ++i) {
    const char* reason = impls[i].decline(x, others.begin(), static_cast<int>(others.size()));
    if (!reason) {
      if (verbose()) std::fprintf(stderr, "normkit: %s: %s\n", op, impls[i].name);
      return &impls[i];
    }
    if (verbose()) std::fprintf(stderr, "normkit: %s: %s declined: %s\n", op, impls[i].name, reason);
  }
  if (verbose()) std::fprintf(stderr, "normkit: %s: reference\n", op);
  return nullptr;
}

// Runs the problem; fills moments (N·G).
template <class T>
void run_forward(ConstTensorView<T> x, TensorView<T> y, int64_t groups, std::span<const T> gamma,
                 std::span<const T> beta, double eps, std::vector<Moments>& moments,
                 const char* op) {
  const SampleGeometry gx = checked_input(x, "x");
  const SampleGeometry gy = checked_like(y, x, "y");
  if (y.data == x.data && !(gx == gy))
    fail_invalid("y: in-place output must have the same strides as x");
  check_groups(groups, x, gx.c);
  check_size(gamma, gx.c, "weight (gamma)", "one per channel", false);
  check_size(beta, gx.c, "bias (beta)", "one per channel", false);
  check_eps(eps);
  moments.assign(static_cast<size_t>(gx.n * groups), Moments{});
  kernels::gn::Forward<T> problem{gx,     gy,  x.data, y.data, gamma.empty() ? nullptr : gamma.data(),
                                  beta.empty() ? nullptr : beta.data(), groups, eps,
                                  moments.data()};
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose(op, gx, {gy})) return impl->forward(problem);
  } else if (verbose()) {
    std::fprintf(stderr, "normkit: %s: double data, reference\n", op);
  }
  kernels::gn::ref::forward(problem);
}

template <class T>
void write_saved(const std::vector<Moments>& moments, SavedStats<T> saved, double eps) {
  for (size_t i = 0; i < moments.size(); ++i) {
    if (!saved.mean.empty()) saved.mean[i] = static_cast<T>(moments[i].mean);
    if (!saved.invstd.empty())
      saved.invstd[i] = static_cast<T>(1.0 / std::sqrt(moments[i].biased_variance() + eps));
  }
}

}  // namespace

template <class T>
void group_norm_forward(ConstTensorView<T> x, TensorView<T> y, int64_t num_groups,
                        std::span<const T> gamma, std::span<const T> beta, SavedStats<T> saved,
                        double eps) {
  // Sizes of the saved statistics depend on N and G: checked before run_forward writes y.
  const SampleGeometry gx = checked_input(x, "x");
  check_groups(num_groups, x, gx.c);
  {
    check_size(saved.mean, gx.n * num_groups, "save_mean", "one per sample and group", false);
    check_size(saved.invstd, gx.n * num_groups, "save_invstd", "one per sample and group", false);
  }
  std::vector<Moments> moments;
  run_forward(x, y, num_groups, gamma, beta, eps, moments, "group_norm_forward");
  write_saved(moments, saved, eps);
}

template <class T>
void group_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                         int64_t num_groups, std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta) {
  const SampleGeometry gx = checked_input(x, "x");
  const SampleGeometry gdy = checked_like(dy, x, "dy");
  const SampleGeometry gdx = dx.data ? checked_like(dx, x, "dx") : gdy;
  if (dx.data && (dx.data == x.data || dx.data == dy.data) &&
      !(gdx == gx && (dx.data != dy.data || gdx == gdy)))
    fail_invalid("dx: in-place output must have the same strides as its input");
  check_groups(num_groups, x, gx.c);
  check_size(gamma, gx.c, "weight (gamma)", "one per channel", false);
  check_size(mean, gx.n * num_groups, "mean", "one per sample and group", true);
  check_size(invstd, gx.n * num_groups, "invstd", "one per sample and group", true);
  check_size(dgamma, gx.c, "dgamma", "one per channel", false);
  check_size(dbeta, gx.c, "dbeta", "one per channel", false);

  std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());
  std::vector<double> dgamma_d(gx.c), dbeta_d(gx.c);
  kernels::gn::Backward<T> problem{gx,         gdy,
                                   gdx,        x.data,
                                   dy.data,    dx.data,
                                   gamma.empty() ? nullptr : gamma.data(),
                                   num_groups, mean_d.data(),
                                   invstd_d.data(), dgamma_d.data(),
                                   dbeta_d.data()};
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose("group_norm_backward", gx, {gdy, gdx})) {
      impl->backward(problem);
      done = true;
    }
  }
  if (!done) kernels::gn::ref::backward(problem);
  for (int64_t c = 0; c < gx.c; ++c) {
    if (!dgamma.empty()) dgamma[c] = static_cast<T>(dgamma_d[c]);
    if (!dbeta.empty()) dbeta[c] = static_cast<T>(dbeta_d[c]);
  }
}

template <class T>
void group_norm_moments(ConstTensorView<T> x, int64_t num_groups, std::span<Moments> moments) {
  const SampleGeometry gx = checked_input(x, "x");
  check_groups(num_groups, x, gx.c);
  check_size(moments, gx.n * num_groups, "moments", "one per sample and group", true);
  if constexpr (std::is_same_v<T, float>) {
    if (const auto* impl = choose("group_norm_moments", gx, {}))
      return impl->moments(gx, x.data, num_groups, moments.data());
  }
  kernels::gn::ref::moments(gx, x.data, num_groups, moments.data());
}

template <class T>
void instance_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                    std::span<const T> gamma, std::span<const T> beta,
                                    SavedStats<T> saved, RunningStats<T> running,
                                    const BatchNormOptions& options) {
  const SampleGeometry gx = checked_input(x, "x");
  if (gx.s <= 1)
    fail_invalid("expected more than 1 spatial element when training, got input size ",
                 x.shape_string());
  check_size(saved.mean, gx.n * gx.c, "save_mean", "one per sample and channel", false);
  check_size(saved.invstd, gx.n * gx.c, "save_invstd", "one per sample and channel", false);
  check_running(running, gx.c, options);

  std::vector<Moments> moments;
  run_forward(x, y, gx.c, gamma, beta, options.eps, moments, "instance_norm_forward_training");

  // The batch value of a channel is the average over samples of the instance
  // mean and of the instance unbiased variance (PyTorch's instance_norm
  // averages the N running statistics it updated). As one Moments per channel
  // with count S: unbiased_variance() = m2 / (S - 1) is that average, and
  // biased_variance() = m2 / S its biased counterpart (Keras' convention).
  if (!running.mean.empty() || running.num_batches_tracked) {
    const double s = static_cast<double>(gx.s);
    std::vector<Moments> per_channel(static_cast<size_t>(gx.c));
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
  write_saved(moments, saved, options.eps);
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
  const SampleGeometry gx = checked_input(x, "x");
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
