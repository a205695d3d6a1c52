// Layer and RMS normalization as PyTorch ops (normkit/layer_norm.hpp), over the
// trailing normalized_shape:
//   normkit::layer_norm, normkit::layer_norm_backward  (dx, dweight, dbias)
//   normkit::rms_norm,   normkit::rms_norm_backward    (dx, dweight)
// The kernels take contiguous rows: x is used as it is when contiguous, else copied;
// y is contiguous, as torch's layer_norm returns it.
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "ops.hpp"

namespace normkit::torch_ops {

namespace {

// x's rows: the product of the leading dimensions by that of normalized_shape.
struct Rows {
  int64_t rows = 1, cols = 1;
  std::vector<int64_t> leading;  // x's leading shape (the statistics' shape)
};

Rows rows_of(const char* op, const Tensor& x, at::IntArrayRef normalized_shape) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k > 0, "normkit.torch: ", op, ": normalized_shape must not be empty");
  TORCH_CHECK(x.dim() >= k && x.sizes().slice(static_cast<size_t>(x.dim() - k)) == normalized_shape,
              "Given normalized_shape=", normalized_shape, ", expected input with shape [*, ",
              c10::Join(", ", normalized_shape), "], but got input of size", x.sizes());
  Rows r;
  for (int64_t axis = 0; axis < x.dim() - k; ++axis) {
    r.rows *= x.size(axis);
    r.leading.push_back(x.size(axis));
  }
  for (const int64_t n : normalized_shape) r.cols *= n;
  return r;
}

template <class T>
RowsView<T> rows_view(const Tensor& t, const Rows& r) {
  return RowsView<T>::contiguous(t.data_ptr<std::remove_const_t<T>>(), r.rows, r.cols);
}

void check_rows_arguments(const char* op, const Tensor& x, const Tensor& weight,
                          const Tensor& bias) {
  check_input(op, x, 1);
  check_parameter(op, "weight", weight, x);
  check_parameter(op, "bias", bias, x);
}

// y and the per-row statistics: (mean, invstd) for layer norm, (undefined, inv_rms)
// for RMS norm (rms = true).
std::tuple<Tensor, Tensor, Tensor> rows_forward(bool rms, const Tensor& input,
                                                at::IntArrayRef normalized_shape,
                                                const Tensor& weight, const Tensor& bias,
                                                double eps) {
  const char* op = rms ? "rms_norm" : "layer_norm";
  check_rows_arguments(op, input, weight, bias);
  const Rows r = rows_of(op, input, normalized_shape);
  const auto type = compute_type(input);
  const Tensor x = computed(input.contiguous(), type);
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mean = rms ? Tensor() : at::empty(r.leading, x.options());
  Tensor invstd = at::empty(r.leading, x.options());
  if (x.numel() > 0) {
    const Tensor gamma = channel_values(weight, type), beta = channel_values(bias, type);
    by_dtype(type, [&](auto t) {
      using T = decltype(t);
      translating_errors([&] {
        if (rms)
          rms_norm_forward<T>(rows_view<const T>(x, r), rows_view<T>(y, r), values_of<T>(gamma),
                              eps, mutable_values_of<T>(invstd));
        else
          layer_norm_forward<T>(rows_view<const T>(x, r), rows_view<T>(y, r), values_of<T>(gamma),
                                values_of<T>(beta),
                                {mutable_values_of<T>(mean), mutable_values_of<T>(invstd)}, eps);
      });
    });
  }
  return {y.scalar_type() == input.scalar_type() ? y : y.to(input.scalar_type()), mean, invstd};
}

// (dx, dweight, dbias) as output_mask asks; dbias never for RMS norm.
std::tuple<Tensor, Tensor, Tensor> rows_backward(bool rms, const Tensor& grad_out,
                                                 const Tensor& input,
                                                 at::IntArrayRef normalized_shape,
                                                 const Tensor& weight, const Tensor& mean,
                                                 const Tensor& invstd,
                                                 std::array<bool, 3> output_mask) {
  const char* op = rms ? "rms_norm_backward" : "layer_norm_backward";
  check_rows_arguments(op, input, weight, Tensor());
  check_like_x("grad_out", grad_out, input);
  const Rows r = rows_of(op, input, normalized_shape);
  const auto type = compute_type(input);
  const Tensor x = computed(input.contiguous(), type), dy = computed(grad_out.contiguous(), type);
  const auto options = x.options();
  Tensor dx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dweight = output_mask[1] ? at::empty(normalized_shape, options) : Tensor();
  Tensor dbias = output_mask[2] && !rms ? at::empty(normalized_shape, options) : Tensor();
  if (x.numel() == 0) {
    for (Tensor* t : {&dx, &dweight, &dbias})
      if (t->defined()) t->zero_();
  } else {
    const Tensor gamma = channel_values(weight, type);
    by_dtype(type, [&](auto t) {
      using T = decltype(t);
      const RowsView<T> dxv = dx.defined() ? rows_view<T>(dx, r) : RowsView<T>{};
      const auto s = values_of<T>(computed(invstd, type).contiguous());
      translating_errors([&] {
        if (rms)
          rms_norm_backward<T>(rows_view<const T>(x, r), rows_view<const T>(dy, r), dxv,
                               values_of<T>(gamma), s, mutable_values_of<T>(dweight));
        else
          layer_norm_backward<T>(rows_view<const T>(x, r), rows_view<const T>(dy, r), dxv,
                                 values_of<T>(gamma),
                                 values_of<T>(computed(mean, type).contiguous()), s,
                                 mutable_values_of<T>(dweight), mutable_values_of<T>(dbias));
      });
    });
  }
  const auto dtype = input.scalar_type();
  return {dx.defined() && dx.scalar_type() != dtype ? dx.to(dtype) : dx,
          parameter_result(dweight, weight), parameter_result(dbias, weight)};
}

// The statistics dimensions of the trailing normalized_shape.
std::vector<int64_t> trailing_dims(const Tensor& x, at::IntArrayRef normalized_shape) {
  std::vector<int64_t> dims;
  for (int64_t axis = x.dim() - static_cast<int64_t>(normalized_shape.size()); axis < x.dim();
       ++axis)
    dims.push_back(axis);
  return dims;
}

// y = (x - mean)·invstd·γ + β (layer norm) or x·inv_rms·γ (RMS norm) per row.
Composite rows_composite(bool rms, std::vector<int64_t> normalized_shape, double eps) {
  return [=](const Primals& p) {
    const Tensor x = p.x.to(compute_type(p.x));
    const auto dims = trailing_dims(x, normalized_shape);
    Tensor y;
    if (rms) {
      y = x * (x.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
    } else {
      const Tensor centered = x - x.mean(dims, /*keepdim=*/true);
      y = centered * (centered.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
    }
    if (p.weight.defined()) y = y * p.weight;
    if (p.bias.defined()) y = y + p.bias;
    return y.to(p.x.scalar_type());
  };
}

// The autograd node of layer_norm and rms_norm.
struct RowsFunction : public torch::autograd::Function<RowsFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, bool rms, at::IntArrayRef normalized_shape,
                        double eps) {
    auto [y, mean, invstd] = rows_forward(rms, input, normalized_shape, value_or_undefined(weight),
                                          value_or_undefined(bias), eps);
    ctx->save_for_backward({input, value_or_undefined(weight), mean, invstd});
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] = input_slots({true, weight.has_value(), bias.has_value()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, at::IntArrayRef normalized_shape,
    const OptionalTensor& weight, const Tensor& mean, const Tensor& invstd, double eps,
    std::array<bool, 3> output_mask) {
  (void)eps;  // the composite's (double backward)
  return rows_backward(false, grad_out, input, normalized_shape, value_or_undefined(weight), mean,
                       invstd, output_mask);
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                 at::IntArrayRef normalized_shape,
                                                 const OptionalTensor& weight,
                                                 const Tensor& inv_rms, double eps,
                                                 std::array<bool, 2> output_mask) {
  (void)eps;
  auto [dx, dweight, dbias] = rows_backward(true, grad_out, input, normalized_shape,
                                            value_or_undefined(weight), Tensor(), inv_rms,
                                            {output_mask[0], output_mask[1], false});
  return {dx, dweight};
}

namespace {

variable_list RowsFunction::backward(AutogradContext* ctx, variable_list grads) {
  const auto saved = ctx->get_saved_variables();
  const auto wanted = wanted_gradients(ctx, 3);
  const auto shape = ctx->saved_data["normalized_shape"].toIntVector();
  const double eps = ctx->saved_data["eps"].toDouble();
  Tensor dx, dweight, dbias;
  if (ctx->saved_data["rms"].toBool()) {
    static const auto op = normkit_op<decltype(rms_norm_backward_cpu)>("normkit::rms_norm_backward");
    std::tie(dx, dweight) =
        op.call(grads[0], saved[0], shape, optional_of(saved[1]), saved[3], eps,
                {wanted[0], wanted[1]});
  } else {
    static const auto op =
        normkit_op<decltype(layer_norm_backward_cpu)>("normkit::layer_norm_backward");
    std::tie(dx, dweight, dbias) =
        op.call(grads[0], saved[0], shape, optional_of(saved[1]), saved[2], saved[3], eps,
                {wanted[0], wanted[1], wanted[2]});
  }
  return {dx, dweight, dbias, Tensor(), Tensor(), Tensor()};
}

Tensor layer_norm_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                      const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  return std::get<0>(rows_forward(false, input, normalized_shape, value_or_undefined(weight),
                                  value_or_undefined(bias), eps));
}

// torch.nn.RMSNorm's eps=None: the machine epsilon of the input's dtype.
double rms_eps(c10::optional<double> eps, const Tensor& input) {
  if (eps) return *eps;
  switch (input.scalar_type()) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::epsilon());
    default: return static_cast<double>(std::numeric_limits<float>::epsilon());
  }
}

Tensor rms_norm_cpu(const Tensor& input, at::IntArrayRef normalized_shape,
                    const OptionalTensor& weight, c10::optional<double> eps) {
  return std::get<0>(rows_forward(true, input, normalized_shape, value_or_undefined(weight),
                                  Tensor(), rms_eps(eps, input)));
}

Tensor layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                           const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  if (!records_graph(input, weight, bias))
    return layer_norm_cpu(input, normalized_shape, weight, bias, eps);
  return RowsFunction::apply(input, weight, bias, false, normalized_shape, eps);
}

Tensor rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                         const OptionalTensor& weight, c10::optional<double> eps) {
  if (!records_graph(input, weight))
    return rms_norm_cpu(input, normalized_shape, weight, eps);
  return RowsFunction::apply(input, weight, c10::optional<Tensor>(), true, normalized_shape,
                             rms_eps(eps, input));
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_autograd(
    const Tensor& grad_out, const Tensor& input, at::IntArrayRef normalized_shape,
    const OptionalTensor& weight, const Tensor& mean, const Tensor& invstd, double eps,
    std::array<bool, 3> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight),
      bias_shape_if(output_mask[2], normalized_shape.vec()),
      [&] {
        return as_list(layer_norm_backward_cpu(grad_out, input, normalized_shape, weight, mean,
                                               invstd, eps, output_mask));
      },
      [&] { return rows_composite(false, normalized_shape.vec(), eps); });
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<Tensor, Tensor> rms_norm_backward_autograd(const Tensor& grad_out, const Tensor& input,
                                                      at::IntArrayRef normalized_shape,
                                                      const OptionalTensor& weight,
                                                      const Tensor& inv_rms, double eps,
                                                      std::array<bool, 2> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight), std::nullopt,
      [&] {
        auto [dx, dweight] = rms_norm_backward_cpu(grad_out, input, normalized_shape, weight,
                                                   inv_rms, eps, output_mask);
        return variable_list{dx, dweight, Tensor()};
      },
      [&] { return rows_composite(true, normalized_shape.vec(), eps); });
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit, m) {
  m.def("layer_norm(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
        "float eps) -> Tensor");
  m.def("layer_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, "
        "Tensor? weight, Tensor mean, Tensor invstd, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, "
        "Tensor? weight, Tensor inv_rms, float eps, bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("rms_norm_backward", &rms_norm_backward_autograd);
}

}  // namespace normkit::torch_ops
