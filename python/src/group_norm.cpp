// Group and instance normalization (normkit/group_norm.hpp). Statistics are per
// (sample, group): they come back as (N, G) arrays and are taken in any shape of N·G
// values. Instance norm is group norm with one channel per group, plus running
// statistics; its inference with them is batch_norm_forward_inference.
#include <string>

#include "families.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

template <class T>
py::tuple group_norm_forward(const py::array& x, int64_t groups, const py::object& weight,
                             const py::object& bias, double eps,
                             const std::optional<std::string>& layout, const py::object& out) {
  auto n = normalization<T>(x, weight, bias, layout, out);
  // A group count that does not divide C is the C++ function's error; the
  // statistics arrays only need a size.
  const int64_t samples = n.x.shape(0), stat_groups = groups > 0 ? groups : 0;
  py::array_t<T> save_mean({samples, stat_groups}), save_invstd({samples, stat_groups});
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    group_norm_forward<T>(xv, yv, groups, gamma, beta, {span_of(save_mean), span_of(save_invstd)},
                          eps);
  });
  return py::make_tuple(n.y, save_mean, save_invstd);
}

// groups = nullopt: instance norm (one group per channel).
template <class T>
py::tuple group_norm_backward(const py::array& x, const py::object& dy,
                              std::optional<int64_t> groups,
                              const py::object& weight, const py::object& mean_object,
                              const py::object& invstd_object,
                              const std::optional<std::string>& layout, const py::object& out,
                              bool compute_dx) {
  auto g = gradients<T>(x, dy, weight, layout, out, compute_dx);
  const auto mean = flat_values<T>(mean_object, "mean");
  const auto invstd = flat_values<T>(invstd_object, "invstd");
  const int64_t group_count = groups.value_or(g.dweight.size());
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto dgamma, auto dbeta) {
    group_norm_backward<T>(xv, dyv, dxv, group_count, gamma, span_of(mean), span_of(invstd),
                           dgamma, dbeta);
  });
  return g.result();
}

template <class T>
py::tuple instance_norm_forward_training(const py::array& x, const py::object& weight,
                                         const py::object& bias, const py::object& running_mean,
                                         const py::object& running_var,
                                         const py::object& num_batches_tracked,
                                         const BatchNormOptions& options,
                                         const std::optional<std::string>& layout,
                                         const py::object& out) {
  auto n = normalization<T>(x, weight, bias, layout, out);
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype_of(n.x),
                          n.operands());
  const int64_t samples = n.x.shape(0), channels = n.channels();
  py::array_t<T> save_mean({samples, channels}), save_invstd({samples, channels});
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    instance_norm_forward_training<T>(xv, yv, gamma, beta,
                                      {span_of(save_mean), span_of(save_invstd)}, running, options);
  });
  return py::make_tuple(n.y, save_mean, save_invstd);
}

}  // namespace

void register_group_norm(py::module_& m) {
  def(
      m, "group_norm_forward",
      [](const py::object& x, int64_t num_groups, const py::object& weight,
         const py::object& bias, double eps, const std::optional<std::string>& layout,
         const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return group_norm_forward<decltype(t)>(a, num_groups, weight, bias, eps, layout, out);
        });
      },
      R"doc(Group normalization: returns (y, mean, invstd), the statistics as (N, num_groups)
arrays (PyTorch's native_group_norm saves the same). weight and bias: one value per channel.
C must be divisible by num_groups.)doc",
      py::arg("x"), py::arg("num_groups"), affine_args(), py::arg("eps") = 1e-5,
      layout_out_args());

  def(
      m, "group_norm_backward",
      [](const py::object& x, const py::object& dy, int64_t num_groups,
         const py::object& weight, const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return group_norm_backward<decltype(t)>(a, dy, num_groups, weight, mean, invstd, layout,
                                                  out, compute_dx);
        });
      },
      "Gradients of group normalization: returns (dx, dweight, dbias); mean and invstd are "
      "group_norm_forward's. compute_dx=False returns dx as None.",
      py::arg("x"), py::arg("dy"), py::arg("num_groups"), py::arg("weight"), py::arg("mean"),
      py::arg("invstd"), backward_tail_args());

  def(
      m, "instance_norm_forward_training", training_forward([](auto t, auto&&... args) {
        return instance_norm_forward_training<decltype(t)>(args...);
      }),
      R"doc(Instance normalization with each instance's own statistics: returns (y, mean, invstd),
the statistics as (N, C) arrays. running_mean and running_var (updated in place when given)
move towards the batch average of the instance means and unbiased variances, as PyTorch's
instance_norm does. Inference with running statistics is batch_norm_forward_inference;
its gradient is batch_norm_backward(mode="frozen").)doc",
      py::arg("x"), affine_args(), running_args(), momentum_eps_args(), layout_out_args(),
      convention_args());

  def(
      m, "instance_norm_backward",
      [](const py::object& x, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return group_norm_backward<decltype(t)>(a, dy, std::nullopt, weight, mean, invstd, layout, out,
                                                  compute_dx);
        });
      },
      "Gradients of instance_norm_forward_training: returns (dx, dweight, dbias).",
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      backward_tail_args());
}

}  // namespace normkit::python
