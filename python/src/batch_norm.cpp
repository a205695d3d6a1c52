// Batch normalization (normkit/batch_norm.hpp, normkit/moments.hpp): forward in
// training and inference, the apply step with given statistics, backward, and the
// moments and running-statistics pieces distributed training is built from.
#include <string>

#include "families.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

py::array_t<Moments> moments_array(const py::object& object, const char* name) {
  if (!py::isinstance<py::array_t<Moments>>(object))
    type_error(std::string(name) + ": expected an array of normkit.moments_dtype (from "
               "batch_norm_moments), got " +
               (py::isinstance<py::array>(object)
                    ? dtype_of(py::reinterpret_borrow<py::array>(object))
                    : type_name(object)));
  auto a = py::array_t<Moments, py::array::c_style>::ensure(object);
  if (a.ndim() != 1)
    value_error(std::string(name) + ": expected a 1-D array, got shape " + shape_of(a));
  return a;
}

// Forward-training with the batch's own statistics, or (`moments` given) with
// those of batch_norm_forward_from_moments (synchronized BN).
template <class T>
py::tuple forward_training(const py::array& x, const py::object& weight, const py::object& bias,
                           const py::object& running_mean, const py::object& running_var,
                           const py::object& num_batches_tracked, const BatchNormOptions& options,
                           const std::optional<std::string>& layout, const py::object& out,
                           const py::object& moments_object = py::none()) {
  std::optional<py::array_t<Moments>> moments;
  if (!moments_object.is_none()) moments = moments_array(moments_object, "moments");
  auto n = normalization<T>(x, weight, bias, layout, out);
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype_of(n.x),
                          n.operands());
  py::array_t<T> save_mean(n.channels()), save_invstd(n.channels());
  const Staged staged = Staged::stage<T>(n.layout, {{&n.x, "x"}}, {&n.y, "out"});
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    const SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
    if (moments)
      batch_norm_forward_from_moments<T>(
          xv, yv, gamma, beta, {moments->data(), static_cast<size_t>(moments->size())}, saved,
          running, options);
    else
      batch_norm_forward_training<T>(xv, yv, gamma, beta, saved, running, options);
  });
  staged.finish(n.y);
  return py::make_tuple(n.y, save_mean, save_invstd);
}

// y from x and two per-channel statistics: batch_norm_forward_inference (running mean
// and variance) and batch_norm_forward_apply (mean and invstd) differ only in the
// statistics and the function that applies them.
template <class T, class Apply>
py::array apply_statistics(const py::array& x, const py::object& weight, const py::object& bias,
                           const py::object& first, const char* first_name,
                           const py::object& second, const char* second_name,
                           const std::optional<std::string>& layout, const py::object& out,
                           Apply&& apply) {
  auto n = normalization<T>(x, weight, bias, layout, out);
  const auto a = required_channel_values<T>(first, first_name);
  const auto b = required_channel_values<T>(second, second_name);
  const Staged staged = Staged::stage<T>(n.layout, {{&n.x, "x"}}, {&n.y, "out"});
  n.run([&](auto xv, auto yv, auto gamma, auto beta) {
    apply(xv, yv, gamma, beta, span_of(a), span_of(b));
  });
  staged.finish(n.y);
  return n.y;
}

template <class T>
py::tuple backward(const py::array& x, const py::object& dy, const py::object& weight,
                   const py::object& mean_object, const py::object& invstd_object,
                   const std::string& mode_name, const std::optional<std::string>& layout,
                   const py::object& out, bool compute_dx) {
  const BackwardMode mode = mode_of(mode_name);
  auto g = gradients<T>(x, dy, weight, layout, out, compute_dx);
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const Staged staged = Staged::stage<T>(g.layout, {{&g.x, "x"}, {&g.dy, "dy"}},
                                         {g.dx ? &*g.dx : nullptr, "out"});
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto dgamma, auto dbeta) {
    batch_norm_backward<T>(xv, dyv, dxv, gamma, span_of(mean), span_of(invstd), dgamma, dbeta,
                           mode);
  });
  if (g.dx) staged.finish(*g.dx);
  return g.result();
}

// Synchronized BN's backward halves: this shard's Σdy and Σdy·x̂ (float64), and
// dx from the whole batch's.
template <class T>
py::tuple backward_reduce(const py::array& x, const py::object& dy, const py::object& mean_object,
                          const py::object& invstd_object, const std::optional<std::string>& layout) {
  auto g = gradients<T>(x, dy, py::none(), layout, py::none(), false);
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const auto channels = static_cast<py::ssize_t>(channels_of(g.x, g.layout));
  py::array_t<double> sum_dy(channels), sum_dy_xhat(channels);
  const Staged staged = Staged::stage<T>(g.layout, {{&g.x, "x"}, {&g.dy, "dy"}}, {nullptr, "out"});
  g.run([&](auto xv, auto dyv, auto, auto, auto, auto) {
    batch_norm_backward_reduce<T>(xv, dyv, span_of(mean), span_of(invstd), span_of(sum_dy),
                                  span_of(sum_dy_xhat));
  });
  return py::make_tuple(sum_dy, sum_dy_xhat);
}

template <class T>
py::array backward_apply(const py::array& x, const py::object& dy, const py::object& weight,
                         const py::object& mean_object, const py::object& invstd_object,
                         const py::object& sum_dy_object, const py::object& sum_dy_xhat_object,
                         double count, const std::optional<std::string>& layout,
                         const py::object& out) {
  auto g = gradients<T>(x, dy, weight, layout, out, true);
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const auto sum_dy = required_channel_values<double>(sum_dy_object, "sum_dy");
  const auto sum_dy_xhat = required_channel_values<double>(sum_dy_xhat_object, "sum_dy_xhat");
  const Staged staged =
      Staged::stage<T>(g.layout, {{&g.x, "x"}, {&g.dy, "dy"}}, {&*g.dx, "out"});
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto, auto) {
    batch_norm_backward_apply<T>(xv, dyv, dxv, gamma, span_of(mean), span_of(invstd),
                                 span_of(sum_dy), span_of(sum_dy_xhat), count);
  });
  staged.finish(*g.dx);
  return *g.dx;
}

template <class T>
py::array_t<Moments> moments(py::array x, const std::optional<std::string>& layout_name) {
  const Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array_t<Moments> result(channels_of(x, layout));
  const auto xv = input_view<T>(x, layout);
  const std::span<Moments> out(result.mutable_data(), static_cast<size_t>(result.size()));
  {
    py::gil_scoped_release unlocked;
    batch_norm_moments<T>(xv, out);
  }
  return result;
}

py::array_t<Moments> merge(const py::object& a_object, const py::object& b_object) {
  const auto a = moments_array(a_object, "a");
  const auto b = moments_array(b_object, "b");
  if (a.size() != b.size())
    value_error("merge_moments: a has " + std::to_string(a.size()) + " channels, b has " +
                std::to_string(b.size()));
  py::array_t<Moments> result(a.size());
  auto* merged = result.mutable_data();
  for (py::ssize_t c = 0; c < a.size(); ++c) {
    merged[c] = a.data()[c];
    merged[c].merge(b.data()[c]);
  }
  return result;
}

template <class T>
void update_running(const py::array_t<Moments>& batch, const py::object& running_mean,
                    const py::object& running_var, const py::object& num_batches_tracked,
                    const BatchNormOptions& options, const char* dtype) {
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype);
  const std::span<const Moments> stats(batch.data(), static_cast<size_t>(batch.size()));
  batch_norm_update_running<T>(stats, running, options);
}

void update_running_by_dtype(const py::object& batch, const py::object& running_mean,
                             const py::object& running_var, const py::object& num_batches_tracked,
                             std::optional<double> momentum, double eps,
                             const std::string& momentum_convention,
                             const std::string& running_variance) {
  const auto stats = moments_array(batch, "moments");
  const auto options = options_of(momentum, eps, momentum_convention, running_variance);
  // The running arrays decide the element type; without them only the counter moves.
  const bool single = !running_mean.is_none() && py::isinstance<py::array>(running_mean) &&
                      has_dtype<float>(py::reinterpret_borrow<py::array>(running_mean));
  if (single || running_mean.is_none())
    update_running<float>(stats, running_mean, running_var, num_batches_tracked, options,
                          "float32");
  else
    update_running<double>(stats, running_mean, running_var, num_batches_tracked, options,
                           "float64");
}

template <class T>
py::array_t<T> invstd(const py::array& var_array, double eps) {
  const auto var = *channel_values<T>(var_array, "var");
  py::array_t<T> result(var.size());
  batch_norm_invstd<T>(span_of(var), eps, span_of(result));
  return result;
}

py::dict options_dict(const BatchNormOptions& options) {
  py::dict result;
  result["eps"] = options.eps;
  result["momentum"] =
      options.momentum ? py::object(py::float_(*options.momentum)) : py::object(py::none());
  result["momentum_convention"] =
      options.momentum_convention == MomentumConvention::weight_on_new ? "weight_on_new"
                                                                        : "weight_on_old";
  result["running_variance"] =
      options.running_variance == RunningVariance::unbiased ? "unbiased" : "biased";
  return result;
}

}  // namespace

void register_batch_norm(py::module_& m) {
  PYBIND11_NUMPY_DTYPE(Moments, count, mean, m2);
  m.attr("moments_dtype") = py::dtype::of<Moments>();

  def(
      m, "batch_norm_forward_training",
      training_forward([](auto t, auto&&... args) { return forward_training<decltype(t)>(args...); }),
      R"doc(Batch normalization with the batch's own statistics.

Returns (y, save_mean, save_invstd); save_invstd = 1 / sqrt(biased batch variance + eps).
running_mean and running_var (1-D arrays of x's dtype) and num_batches_tracked (one int64)
are updated in place when given. momentum=None is the cumulative average over
num_batches_tracked. layout names the order of x's axes ("NCHW", "NHWC", ...); default
channels-first by x.ndim. Keras conventions: pass **normkit.keras_options().
float32 runs the fast kernels, float64 the reference implementation.)doc",
      py::arg("x"), affine_args(), running_args(), momentum_eps_args(), layout_out_args(),
      convention_args());

  def(
      m, "batch_norm_forward_inference",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var, double eps,
         const std::optional<std::string>& layout, const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          using T = decltype(t);
          return apply_statistics<T>(
              a, weight, bias, running_mean, "running_mean", running_var, "running_var", layout,
              out, [eps](auto xv, auto yv, auto gamma, auto beta, auto mean, auto var) {
                batch_norm_forward_inference<T>(xv, yv, gamma, beta, mean, var, eps);
              });
        });
      },
      "y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. running_mean and "
      "running_var are required.",
      py::arg("x"), affine_args(), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("eps") = 1e-5, layout_out_args());

  def(
      m, "batch_norm_forward_apply",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          using T = decltype(t);
          return apply_statistics<T>(
              a, weight, bias, mean, "mean", invstd, "invstd", layout, out,
              [](auto xv, auto yv, auto gamma, auto beta, auto given_mean, auto given_invstd) {
                batch_norm_forward_apply<T>(xv, yv, gamma, beta, given_mean, given_invstd);
              });
        });
      },
      "y = (x - mean) * invstd * weight + bias with given statistics (e.g. merged moments).",
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("invstd"),
      layout_out_args());

  def(
      m, "batch_norm_backward",
      [](const py::object& x, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd, const std::string& mode,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return backward<decltype(t)>(a, dy, weight, mean, invstd, mode, layout, out, compute_dx);
        });
      },
      R"doc(Gradients of batch normalization: returns (dx, dweight, dbias).

mode="training": mean and invstd are forward-training's saved statistics and gradients
flow through them. mode="frozen": mean is the running mean and invstd =
batch_norm_invstd(running_var, eps); dx = weight * invstd * dy.
compute_dx=False returns dx as None and computes only dweight and dbias.)doc",
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::kw_only(), py::arg("mode") = "training", py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("compute_dx") = true);

  m.def(
      "batch_norm_moments",
      [](const py::object& x, const std::optional<std::string>& layout) {
        return by_dtype(x, [&](auto t, const py::array& a) { return moments<decltype(t)>(a, layout); });
      },
      py::arg("x"), py::kw_only(), py::arg("layout") = py::none(),
      "Per-channel (count, mean, m2) of x as an array of normkit.moments_dtype; "
      "m2 = sum((x - mean)**2). Combine partials with merge_moments.");

  def(
      m, "batch_norm_forward_from_moments",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& moments, const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const std::string& momentum_convention, const std::string& running_variance) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return forward_training<decltype(t)>(
              a, weight, bias, running_mean, running_var, num_batches_tracked,
              options_of(momentum, eps, momentum_convention, running_variance), layout, out,
              moments);
        });
      },
      R"doc(Forward-training with given batch statistics (synchronized BN).

moments (normkit.moments_dtype, one per channel) are the whole batch's, usually every
process's batch_norm_moments merged in a fixed order; x is this process's shard. Returns
(y, save_mean, save_invstd) and updates the running statistics as
batch_norm_forward_training does with the whole batch.)doc",
      py::arg("x"), affine_args(), py::arg("moments"), running_args(), momentum_eps_args(),
      layout_out_args(), convention_args());

  m.def(
      "batch_norm_backward_reduce",
      [](const py::object& x, const py::object& dy, const py::object& mean,
         const py::object& invstd, const std::optional<std::string>& layout) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return backward_reduce<decltype(t)>(a, dy, mean, invstd, layout);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("invstd"), py::kw_only(),
      py::arg("layout") = py::none(),
      "(sum_dy, sum_dy_xhat): this shard's per-channel sums of dy and dy * (x - mean) * invstd "
      "as float64 (synchronized BN: add every process's, then batch_norm_backward_apply). "
      "Their sums over the processes are dbias and dweight.");

  def(
      m, "batch_norm_backward_apply",
      [](const py::object& x, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd, const py::object& sum_dy,
         const py::object& sum_dy_xhat, double count, const std::optional<std::string>& layout,
         const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return backward_apply<decltype(t)>(a, dy, weight, mean, invstd, sum_dy, sum_dy_xhat,
                                             count, layout, out);
        });
      },
      "Training-mode dx of this shard from the whole batch's sums over `count` values per "
      "channel: weight * invstd * (dy - sum_dy / count - x_hat * sum_dy_xhat / count).",
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("count"), layout_out_args());

  m.def("merge_moments", &merge, py::arg("a"), py::arg("b"),
        "Channel-wise merge of two sets of moments (Chan et al.), as if their data were one "
        "batch.");

  def(m, "batch_norm_update_running", &update_running_by_dtype,
      "Update running statistics in place from batch moments, as forward-training does.",
      py::arg("moments"), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("num_batches_tracked") = py::none(),
      momentum_eps_args(), py::kw_only(), convention_args());

  m.def(
      "batch_norm_invstd",
      [](const py::object& var_object, double eps) -> py::array {
        const py::array var = float_array(var_object, "var");
        if (has_dtype<float>(var)) return invstd<float>(var, eps);
        return invstd<double>(var, eps);
      },
      py::arg("var"), py::arg("eps") = 1e-5, "1 / sqrt(var + eps), per channel.");

  m.def(
      "keras_options", [] { return options_dict(BatchNormOptions::keras()); },
      "tf.keras BatchNormalization's conventions as keyword arguments for "
      "batch_norm_forward_training: eps 1e-3, momentum 0.99 on the old value, biased variance.");
  m.def(
      "pytorch_options", [] { return options_dict(BatchNormOptions{}); },
      "PyTorch's conventions (the defaults) as keyword arguments.");
}

}  // namespace normkit::python
