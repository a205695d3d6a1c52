// Batch Renormalization and Ghost BN (normkit/bn_variants.hpp). Frozen BN needs no
// functions of its own: it is batch_norm_forward_inference and batch_norm_backward
// with mode="frozen".
#include <string>

#include "families.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

template <class T>
py::tuple renorm_forward_training(const py::array& x, const py::object& weight,
                                  const py::object& bias, const py::object& running_mean,
                                  const py::object& running_var,
                                  const py::object& num_batches_tracked, RenormLimits limits,
                                  const BatchNormOptions& options,
                                  const std::optional<std::string>& layout, const py::object& out) {
  auto n = normalization<T>(x, weight, bias, layout, out);
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype_of(n.x),
                          n.operands());
  const int64_t channels = n.channels();
  py::array_t<T> save_mean(channels), save_invstd(channels), r(channels), d(channels);
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    batch_renorm_forward_training<T>(
        xv, yv, gamma, beta, {span_of(save_mean), span_of(save_invstd), span_of(r), span_of(d)},
        running, limits, options);
  });
  return py::make_tuple(n.y, save_mean, save_invstd, r, d);
}

template <class T>
py::tuple renorm_backward(const py::array& x, const py::object& dy, const py::object& weight,
                          const py::object& mean_object, const py::object& invstd_object,
                          const py::object& r_object, const py::object& d_object,
                          const std::optional<std::string>& layout, const py::object& out,
                          bool compute_dx) {
  auto g = gradients<T>(x, dy, weight, layout, out, compute_dx);
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const auto r = required_channel_values<T>(r_object, "r");
  const auto d = required_channel_values<T>(d_object, "d");
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto dgamma, auto dbeta) {
    batch_renorm_backward<T>(xv, dyv, dxv, gamma, span_of(mean), span_of(invstd), span_of(r),
                             span_of(d), dgamma, dbeta);
  });
  return g.result();
}

template <class T>
py::tuple ghost_forward_training(const py::array& x, int64_t virtual_batch_size,
                                 const py::object& weight, const py::object& bias,
                                 const py::object& running_mean, const py::object& running_var,
                                 const py::object& num_batches_tracked,
                                 const BatchNormOptions& options,
                                 const std::optional<std::string>& layout, const py::object& out) {
  auto n = normalization<T>(x, weight, bias, layout, out);
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype_of(n.x),
                          n.operands());
  const int64_t ghosts = ghost_batch_count(n.x.shape(0), virtual_batch_size);
  py::array_t<T> save_mean({ghosts, n.channels()}), save_invstd({ghosts, n.channels()});
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    ghost_batch_norm_forward_training<T>(xv, yv, gamma, beta, virtual_batch_size,
                                         {span_of(save_mean), span_of(save_invstd)}, running,
                                         options);
  });
  return py::make_tuple(n.y, save_mean, save_invstd);
}

// mean and invstd: per virtual batch and channel, (ghosts, C) or flat.
template <class T>
py::tuple ghost_backward(const py::array& x, const py::object& dy, const py::object& weight,
                         int64_t virtual_batch_size, const py::object& mean_object,
                         const py::object& invstd_object,
                         const std::optional<std::string>& layout, const py::object& out,
                         bool compute_dx) {
  auto g = gradients<T>(x, dy, weight, layout, out, compute_dx);
  const auto mean = flat_values<T>(mean_object, "mean");
  const auto invstd = flat_values<T>(invstd_object, "invstd");
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto dgamma, auto dbeta) {
    ghost_batch_norm_backward<T>(xv, dyv, dxv, gamma, virtual_batch_size, span_of(mean),
                                 span_of(invstd), dgamma, dbeta);
  });
  return g.result();
}

}  // namespace

void register_bn_variants(py::module_& m) {
  def(
      m, "batch_renorm_forward_training",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, double rmax, double dmax,
         std::optional<double> momentum, double eps, const std::optional<std::string>& layout,
         const py::object& out, const std::string& momentum_convention,
         const std::string& running_variance) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return renorm_forward_training<decltype(t)>(
              a, weight, bias, running_mean, running_var, num_batches_tracked, {rmax, dmax},
              options_of(momentum, eps, momentum_convention, running_variance), layout, out);
        });
      },
      R"doc(Batch Renormalization (Ioffe 2017, Algorithm 1) in training.

Returns (y, save_mean, save_invstd, r, d). r = clip(sigma_B / sigma, 1/rmax, rmax),
d = clip((mu_B - mu) / sigma, -dmax, dmax) with sigma = sqrt(running_var + eps);
y = weight * ((x - mu_B) * save_invstd * r + d) + bias. running_mean and running_var are
required and are updated in place as batch_norm_forward_training updates them.)doc",
      py::arg("x"), affine_args(), running_args(), py::arg("rmax") = 1.0, py::arg("dmax") = 0.0,
      momentum_eps_args(), layout_out_args(), convention_args());

  def(
      m, "batch_renorm_backward",
      [](const py::object& x, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd, const py::object& r,
         const py::object& d, const std::optional<std::string>& layout, const py::object& out,
         bool compute_dx) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return renorm_backward<decltype(t)>(a, dy, weight, mean, invstd, r, d, layout, out,
                                              compute_dx);
        });
      },
      "Gradients of batch renormalization with r and d constant: returns (dx, dweight, dbias).",
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::arg("r"), py::arg("d"), backward_tail_args());

  m.def(
      "batch_renorm_limits",
      [](int64_t step, double rmax, double dmax, int64_t hold_steps, int64_t rmax_ramp_steps,
         int64_t dmax_ramp_steps) {
        const auto limits =
            BatchRenormSchedule{rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps}.at(step);
        return py::make_tuple(limits.rmax, limits.dmax);
      },
      py::arg("step"), py::kw_only(), py::arg("rmax") = 3.0, py::arg("dmax") = 5.0,
      py::arg("hold_steps") = 0, py::arg("rmax_ramp_steps") = 0, py::arg("dmax_ramp_steps") = 0,
      "(rmax, dmax) at a training step: 1 and 0 for hold_steps, then each rising linearly to its "
      "final value over its ramp.");

  def(
      m, "ghost_batch_norm_forward_training",
      [](const py::object& x, int64_t virtual_batch_size, const py::object& weight,
         const py::object& bias, const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const std::string& momentum_convention, const std::string& running_variance) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return ghost_forward_training<decltype(t)>(
              a, virtual_batch_size, weight, bias, running_mean, running_var, num_batches_tracked,
              options_of(momentum, eps, momentum_convention, running_variance), layout, out);
        });
      },
      R"doc(Ghost batch normalization in training: BN on each slice of virtual_batch_size
samples (x.split(virtual_batch_size); the last may be smaller), running statistics updated
once per slice in order. Returns (y, save_mean, save_invstd), the saved statistics of shape
(number of virtual batches, C).)doc",
      py::arg("x"), py::arg("virtual_batch_size"), affine_args(), running_args(),
      momentum_eps_args(), layout_out_args(), convention_args());

  def(
      m, "ghost_batch_norm_backward",
      [](const py::object& x, const py::object& dy, const py::object& weight,
         int64_t virtual_batch_size, const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return ghost_backward<decltype(t)>(a, dy, weight, virtual_batch_size, mean, invstd,
                                             layout, out, compute_dx);
        });
      },
      "Gradients of ghost batch normalization: returns (dx, dweight, dbias).",
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("virtual_batch_size"),
      py::arg("mean"), py::arg("invstd"), backward_tail_args());
}

}  // namespace normkit::python
