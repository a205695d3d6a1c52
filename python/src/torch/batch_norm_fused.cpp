// Fused BN+ReLU and BN+Add+ReLU as PyTorch ops (normkit/batch_norm_fused.hpp):
//   normkit::batch_norm_relu           y = relu(batch_norm(x) [+ residual])
//   normkit::batch_norm_relu_backward  (dx, dresidual, dweight, dbias)
// The ReLU mask stays in the forward's autograd node as bits (1/32 of a float
// mask), in the memory order of x laid out as its output (Laid), which backward
// lays x out in again.
#include <torch/library.h>

#include <tuple>

#include "ops.hpp"

namespace normkit::torch_ops {

namespace {

struct FusedResult {
  Tensor y, mask, mean, invstd;
};

FusedResult batch_norm_relu_forward(const Tensor& input, const Tensor& residual,
                                    const Tensor& weight, const Tensor& bias,
                                    const Running& running, bool training,
                                    c10::optional<double> momentum, double eps) {
  const Laid laid(input);
  const Tensor x = laid(input);
  const Tensor z = residual.defined() ? laid(residual) : Tensor();
  const int64_t channels = x.size(1);
  const auto options = x.options();
  Tensor y = at::empty_like(x);
  Tensor mask = at::empty({relu_mask_bytes(x.numel())}, options.dtype(at::kByte));
  if (x.numel() == 0) {
    if (training) running.count_empty_batch();
    return {laid.result(y), mask, at::zeros({channels}, options), at::zeros({channels}, options)};
  }
  const Tensor gamma = channel_values(weight, laid.type), beta = channel_values(bias, laid.type);
  Tensor mean = at::empty({channels}, options), invstd = at::empty({channels}, options);
  const std::span<uint8_t> bits(mask.data_ptr<uint8_t>(), static_cast<size_t>(mask.numel()));
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    const auto xv = input_view<T>(x);
    const auto yv = view_of<T>(y);
    const auto g = values_of<T>(gamma), b = values_of<T>(beta);
    if (training) {
      const SavedStats<T> saved{mutable_values_of<T>(mean), mutable_values_of<T>(invstd)};
      const auto options_ = torch_options(momentum, eps);
      translating_errors([&] {
        if (z.defined())
          batch_norm_add_relu_forward_training<T>(xv, input_view<T>(z), yv, bits, g, b, saved,
                                                  running.stats<T>(), options_);
        else
          batch_norm_relu_forward_training<T>(xv, yv, bits, g, b, saved, running.stats<T>(),
                                              options_);
      });
      running.finish();
    } else {
      TORCH_CHECK(running.mean.work.defined() && running.var.work.defined(),
                  "normkit.torch: running_mean and running_var must both be defined in "
                  "evaluation mode");
      mean = running.mean.work.clone();
      const auto rm = values_of<T>(running.mean.work), rv = values_of<T>(running.var.work);
      translating_errors([&] {
        if (z.defined())
          batch_norm_add_relu_forward_inference<T>(xv, input_view<T>(z), yv, bits, g, b, rm, rv,
                                                   eps);
        else
          batch_norm_relu_forward_inference<T>(xv, yv, bits, g, b, rm, rv, eps);
        batch_norm_invstd<T>(rv, eps, mutable_values_of<T>(invstd));
      });
    }
  });
  return {laid.result(y), mask, mean, invstd};
}

// The mask's bits as a tensor of x's shape (1 where the pre-activation was > 0):
// bit k belongs to the element at the k-th lowest address of x laid out.
Tensor unpacked_mask(const Tensor& mask, const Tensor& x) {
  const Tensor dense = at::empty(x.sizes(), x.options().dtype(at::kBool)
                                               .memory_format(Laid(x).format));
  const uint8_t* bits = mask.data_ptr<uint8_t>();
  bool* values = dense.data_ptr<bool>();
  for (int64_t k = 0; k < x.numel(); ++k) values[k] = (bits[k / 8] >> (k % 8)) & 1;
  return dense;
}

Composite fused_composite(const Tensor& mask, const Tensor& mean, const Tensor& invstd,
                          bool training, double eps) {
  return [=](const Primals& p) {
    const auto type = compute_type(p.x);
    const Tensor x = p.x.to(type);
    Tensor pre = affine(normalized_per_channel(x, mean, invstd, training, eps), p.weight, p.bias);
    if (p.residual.defined()) pre = pre + p.residual.to(type);
    return (pre * unpacked_mask(mask, p.x).to(type)).to(p.x.scalar_type());
  };
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_relu_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const Tensor& mask,
    const OptionalTensor& weight_arg, const Tensor& mean, const Tensor& invstd, bool training,
    bool residual, double eps, std::array<bool, 4> output_mask) {
  (void)eps;  // the composite's (double backward)
  const Tensor weight = value_or_undefined(weight_arg);
  check_input("batch_norm_relu_backward", input);
  check_like_x("grad_out", grad_out, input);
  check_parameter("batch_norm_relu_backward", "weight", weight, input);
  const Laid laid(input);
  const Tensor x = laid(input), dy = laid(grad_out);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.is_contiguous() &&
                  mask.numel() == relu_mask_bytes(x.numel()),
              "normkit.torch: mask must be the forward's ", relu_mask_bytes(x.numel()),
              " bytes of uint8, got ", mask.scalar_type(), " of shape ", mask.sizes());
  const auto mode = training ? BackwardMode::training : BackwardMode::frozen;
  const bool want_dz = residual && output_mask[1];
  Tensor dz = want_dz ? (x.numel() == 0 ? at::zeros_like(x) : at::empty_like(x)) : Tensor();
  const std::span<const uint8_t> bits(mask.data_ptr<uint8_t>(), static_cast<size_t>(mask.numel()));
  auto [dx, dweight, dbias] = backward_by_kernel(
      laid, x, weight, {output_mask[0], output_mask[2], output_mask[3]},
      [&](auto t, auto dxv, auto dgamma, auto dbeta, auto gamma) {
        using T = decltype(t);
        const auto m = values_of<T>(channel_values(mean, laid.type));
        const auto s = values_of<T>(channel_values(invstd, laid.type));
        if (residual)
          batch_norm_add_relu_backward<T>(input_view<T>(x), input_view<T>(dy), bits, dxv,
                                          dz.defined() ? view_of<T>(dz) : TensorView<T>{}, gamma,
                                          m, s, dgamma, dbeta, mode);
        else
          batch_norm_relu_backward<T>(input_view<T>(x), input_view<T>(dy), bits, dxv, gamma, m, s,
                                      dgamma, dbeta, mode);
      });
  return {dx, dz.defined() ? laid.result(dz) : dz, dweight, dbias};
}

Tensor batch_norm_relu_cpu(const Tensor& input, const OptionalTensor& residual,
                           const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var,
                           const OptionalTensor& num_batches_tracked, bool training,
                           c10::optional<double> momentum, double eps) {
  check_batch_norm_arguments("batch_norm_relu", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  if (residual) check_like_x("residual", *residual, input);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return batch_norm_relu_forward(input, value_or_undefined(residual), value_or_undefined(weight),
                                 value_or_undefined(bias), running, training, momentum, eps)
      .y;
}

namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_relu_backward_autograd(
    const Tensor& grad_out, const Tensor& input, const Tensor& mask, const OptionalTensor& weight,
    const Tensor& mean, const Tensor& invstd, bool training, bool residual, double eps,
    std::array<bool, 4> output_mask) {
  // The residual's value does not enter the gradient: a zero stand-in (broadcast, not
  // allocated) holds its slot among the outputs (dx, dresidual, dweight, dbias).
  const Tensor residual_slot = at::zeros({}, input.options()).expand(input.sizes());
  const auto outputs = gradient_of(
      grad_out, input, residual_slot, value_or_undefined(weight),
      bias_shape_if(output_mask[3], {input.size(1)}),
      [&] {
        return as_list(batch_norm_relu_backward_cpu(grad_out, input, mask, weight, mean, invstd,
                                                    training, residual, eps, output_mask));
      },
      [&] { return fused_composite(mask, mean, invstd, training, eps); });
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

struct BatchNormReluFunction : public torch::autograd::Function<BatchNormReluFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& residual,
                        const OptionalTensor& weight, const OptionalTensor& bias,
                        const Running& running, bool training, c10::optional<double> momentum,
                        double eps) {
    auto r = batch_norm_relu_forward(input, value_or_undefined(residual),
                                     value_or_undefined(weight), value_or_undefined(bias), running,
                                     training, momentum, eps);
    ctx->save_for_backward({input, value_or_undefined(weight), r.mask, r.mean, r.invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] =
        input_slots({true, residual.has_value(), weight.has_value(), bias.has_value()});
    return r.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto wanted = wanted_gradients(ctx, 4);
    const bool residual = ctx->saved_data["inputs"].toInt() & 2;
    static const auto op =
        normkit_op<decltype(batch_norm_relu_backward_cpu)>("normkit::batch_norm_relu_backward");
    const auto [dx, dz, dweight, dbias] =
        op.call(grads[0], saved[0], saved[2], optional_of(saved[1]), saved[3], saved[4],
                ctx->saved_data["training"].toBool(), residual, ctx->saved_data["eps"].toDouble(),
                {wanted[0], wanted[1], wanted[2], wanted[3]});
    return {dx, dz, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm_relu_autograd(const Tensor& input, const OptionalTensor& residual,
                                const OptionalTensor& weight, const OptionalTensor& bias,
                                const OptionalTensor& running_mean,
                                const OptionalTensor& running_var,
                                const OptionalTensor& num_batches_tracked, bool training,
                                c10::optional<double> momentum, double eps) {
  if (!records_graph(input, residual, weight,
                      bias))
    return batch_norm_relu_cpu(input, residual, weight, bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps);
  check_batch_norm_arguments("batch_norm_relu", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  if (residual) check_like_x("residual", *residual, input);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return BatchNormReluFunction::apply(input, residual, weight, bias, running, training, momentum,
                                      eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit, m) {
  m.def("batch_norm_relu(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "bool training, float? momentum, float eps) -> Tensor");
  m.def("batch_norm_relu_backward(Tensor grad_out, Tensor input, Tensor mask, Tensor? weight, "
        "Tensor mean, Tensor invstd, bool training, bool residual, float eps, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_autograd);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_autograd);
}

}  // namespace normkit::torch_ops
