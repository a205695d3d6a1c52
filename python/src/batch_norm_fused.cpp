// Fused BN+ReLU and BN+Add+ReLU (normkit/batch_norm_fused.hpp). The ReLU mask is a
// 1-D uint8 array of ceil(x.size / 8) bytes, bits in x's memory order (which a copy
// in order "K" keeps, so x may be compacted below without changing the meaning of a
// mask).
#include <string>
#include <utility>

#include "families.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

py::array_t<uint8_t> mask_out(const py::object& object, int64_t numel) {
  const int64_t bytes = relu_mask_bytes(numel);
  if (object.is_none()) return py::array_t<uint8_t>(bytes);
  if (!py::isinstance<py::array_t<uint8_t>>(object))
    type_error("mask: expected a numpy.ndarray of uint8 (it is written), got " + type_name(object));
  auto a = py::reinterpret_borrow<py::array_t<uint8_t>>(object);
  if (a.ndim() != 1 || !(a.flags() & py::array::c_style))
    value_error("mask: expected a contiguous 1-D array, got shape " + shape_of(a));
  if (!a.writeable()) value_error("mask: array is read-only");
  return a;
}

py::array_t<uint8_t, py::array::c_style> mask_in(const py::object& object) {
  if (object.is_none()) value_error("mask is required (from the forward pass)");
  py::array a = py::array::ensure(object);
  if (!a || !has_dtype<uint8_t>(a))
    type_error("mask: expected an array of uint8 (from the forward pass)");
  if (a.ndim() != 1) value_error("mask: expected a 1-D array, got shape " + shape_of(a));
  return py::array_t<uint8_t, py::array::c_style>::ensure(a);
}

bool dense(const py::array& a) { return a.attr("strides").equal(empty_like(a).attr("strides")); }

// x readable and, when a residual comes with it, compacted in its own memory order:
// the residual and its gradient must have x's strides, and new arrays are dense.
template <class T>
py::array compact(py::array x) {
  x = readable<T>(x);
  return dense(x) ? x : copy_keeping_order(x);
}

// The residual brought to x's strides.
template <class T>
py::array residual_like(const py::object& z_object, const py::array& x) {
  py::array z = readable_like<T>(z_object, x, "residual");
  if (z.attr("strides").equal(x.attr("strides"))) return z;
  py::array copy = empty_like(x);
  numpy().attr("copyto")(copy, z);
  return copy;
}

// The arguments both forwards start from: x (compacted when there is a residual), y,
// γ, β, the residual and the mask the call writes.
template <class T>
struct FusedForward {
  Normalization<T> n;
  std::optional<py::array> z;
  py::array_t<uint8_t> mask;

  std::optional<ConstTensorView<T>> z_view() const {
    if (!z) return std::nullopt;
    return input_view<T>(*z, n.layout);
  }
  std::span<uint8_t> mask_bytes() { return {mask.mutable_data(), static_cast<size_t>(mask.size())}; }
  std::vector<Operand> operands() const {
    std::vector<Operand> all = n.operands();
    all.push_back({z ? py::handle(*z) : py::handle(Py_None), "residual"});
    all.push_back({mask, "mask"});
    return all;
  }

  // Runs call(x, residual or nullopt, y, mask, γ, β) on the views, without the GIL.
  template <class Call>
  void run(Call&& call) {
    const auto zv = z_view();
    const auto bits = mask_bytes();
    n.run([&](auto xv, auto yv, auto gamma, auto beta) { call(xv, zv, yv, bits, gamma, beta); });
  }
};

template <class T>
FusedForward<T> fused_forward(const py::array& x_in, const py::object& z_object,
                              const py::object& weight, const py::object& bias,
                              const std::optional<std::string>& layout, const py::object& out,
                              const py::object& mask_object) {
  layout_for(layout, x_in);  // x's own errors first
  const py::array x = z_object.is_none() ? readable<T>(x_in) : compact<T>(x_in);
  std::optional<py::array> z;
  if (!z_object.is_none()) z = residual_like<T>(z_object, x);
  auto n = normalization<T>(x, weight, bias, layout, out);
  if (z) check_no_partial_overlap(n.y, *z, "out", "residual");
  auto mask = mask_out(mask_object, n.x.size());
  return {std::move(n), std::move(z), std::move(mask)};
}

template <class T>
py::tuple forward_training(const py::array& x, const py::object& z_object, const py::object& weight,
                           const py::object& bias, const py::object& running_mean,
                           const py::object& running_var, const py::object& num_batches_tracked,
                           const BatchNormOptions& options,
                           const std::optional<std::string>& layout, const py::object& out,
                           const py::object& mask_object) {
  auto f = fused_forward<T>(x, z_object, weight, bias, layout, out, mask_object);
  const RunningStats<T> running =
      running_in_place<T>(running_mean, running_var, num_batches_tracked, dtype_of(f.n.x),
                          f.operands());
  py::array_t<T> save_mean(f.n.channels()), save_invstd(f.n.channels());
  const SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
  f.run([&](auto xv, auto zv, auto yv, auto mask, auto gamma, auto beta) {
    if (zv)
      batch_norm_add_relu_forward_training<T>(xv, *zv, yv, mask, gamma, beta, saved, running,
                                              options);
    else
      batch_norm_relu_forward_training<T>(xv, yv, mask, gamma, beta, saved, running, options);
  });
  return py::make_tuple(f.n.y, f.mask, save_mean, save_invstd);
}

template <class T>
py::tuple forward_inference(const py::array& x, const py::object& z_object,
                            const py::object& weight, const py::object& bias,
                            const py::object& running_mean, const py::object& running_var,
                            double eps, const std::optional<std::string>& layout,
                            const py::object& out, const py::object& mask_object) {
  auto f = fused_forward<T>(x, z_object, weight, bias, layout, out, mask_object);
  const auto mean = required_channel_values<T>(running_mean, "running_mean");
  const auto var = required_channel_values<T>(running_var, "running_var");
  f.run([&](auto xv, auto zv, auto yv, auto mask, auto gamma, auto beta) {
    if (zv)
      batch_norm_add_relu_forward_inference<T>(xv, *zv, yv, mask, gamma, beta, span_of(mean),
                                               span_of(var), eps);
    else
      batch_norm_relu_forward_inference<T>(xv, yv, mask, gamma, beta, span_of(mean),
                                           span_of(var), eps);
  });
  return py::make_tuple(f.n.y, f.mask);
}

template <class T>
py::tuple backward(const py::array& x, const py::object& dy, const py::object& mask_object,
                   const py::object& weight, const py::object& mean_object,
                   const py::object& invstd_object, const std::string& mode_name,
                   const std::optional<std::string>& layout, const py::object& out,
                   bool compute_dx, bool add) {
  const BackwardMode mode = mode_of(mode_name);
  auto g = gradients<T>(x, dy, weight, layout, out, compute_dx, add ? &compact<T> : &readable<T>);
  const auto mask = mask_in(mask_object);
  std::optional<py::array> dz;
  if (add) dz = empty_like(g.x);
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const TensorView<T> dzv = dz ? output_view<T>(*dz, g.layout) : TensorView<T>{};
  const std::span<const uint8_t> bits(mask.data(), static_cast<size_t>(mask.size()));
  g.run([&](auto xv, auto dyv, auto dxv, auto gamma, auto dgamma, auto dbeta) {
    if (add)
      batch_norm_add_relu_backward<T>(xv, dyv, bits, dxv, dzv, gamma, span_of(mean),
                                      span_of(invstd), dgamma, dbeta, mode);
    else
      batch_norm_relu_backward<T>(xv, dyv, bits, dxv, gamma, span_of(mean), span_of(invstd),
                                  dgamma, dbeta, mode);
  });
  if (add) return py::make_tuple(g.dx_or_none(), *dz, g.dweight, g.dbias);
  return g.result();
}

// The Python functions: relu(BN(x)) with add = false, relu(BN(x) + residual) with
// add = true, which takes the residual as its second argument.
auto training(bool add) {
  return [add](const py::object& x, const py::object& residual, const py::object& weight,
               const py::object& bias, const py::object& running_mean,
               const py::object& running_var, const py::object& num_batches_tracked,
               std::optional<double> momentum, double eps,
               const std::optional<std::string>& layout, const py::object& out,
               const py::object& mask, const std::string& momentum_convention,
               const std::string& running_variance) {
    return by_dtype(x, [&](auto t, const py::array& a) {
      if (add && residual.is_none()) value_error("residual is required");
      return forward_training<decltype(t)>(
          a, add ? residual : py::none(), weight, bias, running_mean, running_var,
          num_batches_tracked, options_of(momentum, eps, momentum_convention, running_variance),
          layout, out, mask);
    });
  };
}

auto inference(bool add) {
  return [add](const py::object& x, const py::object& residual, const py::object& weight,
               const py::object& bias, const py::object& running_mean,
               const py::object& running_var, double eps,
               const std::optional<std::string>& layout, const py::object& out,
               const py::object& mask) {
    return by_dtype(x, [&](auto t, const py::array& a) {
      if (add && residual.is_none()) value_error("residual is required");
      return forward_inference<decltype(t)>(a, add ? residual : py::none(), weight, bias,
                                            running_mean, running_var, eps, layout, out, mask);
    });
  };
}

auto gradient(bool add) {
  return [add](const py::object& x, const py::object& dy, const py::object& mask,
               const py::object& weight, const py::object& mean, const py::object& invstd,
               const std::string& mode, const std::optional<std::string>& layout,
               const py::object& out, bool compute_dx) {
    return by_dtype(x, [&](auto t, const py::array& a) {
      return backward<decltype(t)>(a, dy, mask, weight, mean, invstd, mode, layout, out,
                                   compute_dx, add);
    });
  };
}

std::tuple<py::kw_only, py::arg_v, py::arg_v, py::arg_v> mask_tail_args() {
  return {py::kw_only(), py::arg("layout") = py::none(), py::arg("out") = py::none(),
          py::arg("mask") = py::none()};
}

}  // namespace

void register_batch_norm_fused(py::module_& m) {
  const char* training_doc = R"doc(Batch normalization with the batch's statistics, then [+ residual and] ReLU.

Returns (y, mask, save_mean, save_invstd); mask is a uint8 array of ceil(x.size / 8)
bytes, bit k (bit k % 8 of byte k // 8) = pre-activation > 0 for the element with the
k-th lowest address in x. Other arguments as batch_norm_forward_training.)doc";
  def(
      m, "batch_norm_relu_forward_training",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& rm, const py::object& rv, const py::object& nbt,
         std::optional<double> momentum, double eps, const std::optional<std::string>& layout,
         const py::object& out, const py::object& mask, const std::string& mc,
         const std::string& rvar) {
        return training(false)(x, py::none(), weight, bias, rm, rv, nbt, momentum, eps, layout,
                               out, mask, mc, rvar);
      },
      training_doc, py::arg("x"), affine_args(), running_args(), momentum_eps_args(),
      mask_tail_args(), convention_args());
  def(m, "batch_norm_add_relu_forward_training", training(true), training_doc, py::arg("x"),
      py::arg("residual"), affine_args(), running_args(), momentum_eps_args(), mask_tail_args(),
      convention_args());

  def(
      m, "batch_norm_relu_forward_inference",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& rm, const py::object& rv, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const py::object& mask) {
        return inference(false)(x, py::none(), weight, bias, rm, rv, eps, layout, out, mask);
      },
      "relu(batch_norm with running statistics): returns (y, mask).", py::arg("x"),
      affine_args(), py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("eps") = 1e-5, mask_tail_args());
  def(m, "batch_norm_add_relu_forward_inference", inference(true),
      "relu(batch_norm with running statistics + residual): returns (y, mask).", py::arg("x"),
      py::arg("residual"), affine_args(), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("eps") = 1e-5, mask_tail_args());

  const auto gradient_args = std::make_tuple(
      py::arg("x"), py::arg("dy"), py::arg("mask"), py::arg("weight"), py::arg("mean"),
      py::arg("invstd"), py::kw_only(), py::arg("mode") = "training",
      py::arg("layout") = py::none(), py::arg("out") = py::none(), py::arg("compute_dx") = true);
  def(m, "batch_norm_relu_backward", gradient(false),
      "Gradients through relu(batch_norm(x)) given the forward's mask: (dx, dweight, dbias).",
      gradient_args);
  def(m, "batch_norm_add_relu_backward", gradient(true),
      "Gradients through relu(batch_norm(x) + residual) given the forward's mask: "
      "(dx, dresidual, dweight, dbias).",
      gradient_args);
  m.def("relu_mask_bytes", &relu_mask_bytes, py::arg("numel"),
        "Bytes of a ReLU mask for numel elements: ceil(numel / 8).");
}

}  // namespace normkit::python
