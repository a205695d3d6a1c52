// Batch normalization as PyTorch ops (normkit/batch_norm.hpp):
//   normkit::batch_norm           y, with the batch's statistics (training: updates
//                                 the running statistics given) or the running ones
//   normkit::batch_norm_backward  (dx, dweight, dbias)
// The forward's saved statistics stay inside its autograd node, as in torch's own
// batch_norm. Frozen BN, instance norm with running statistics and every variant's
// inference are this op with training=False.
#include <torch/library.h>

#include <tuple>

#include "autograd.hpp"
#include "ops.hpp"
#include "tensors.hpp"

namespace normkit::torch_ops {

BatchNormResult batch_norm_forward(const Tensor& input, const Tensor& weight, const Tensor& bias,
                                   const Running& running, bool training,
                                   c10::optional<double> momentum, double eps) {
  const Laid laid(input);
  const Tensor x = laid(input);
  const int64_t channels = x.size(1);
  const auto options = x.options().dtype(laid.type);
  if (x.numel() == 0) {
    // PyTorch returns an empty result and, in training, still counts the batch.
    if (training) running.count_empty_batch();
    return {laid.result(at::empty_like(x)), at::zeros({channels}, options),
            at::zeros({channels}, options)};
  }
  const Tensor gamma = channel_values(weight, laid.type), beta = channel_values(bias, laid.type);
  Tensor y = at::empty_like(x), mean, invstd;
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    if (training) {
      mean = at::empty({channels}, options);
      invstd = at::empty({channels}, options);
      translating_errors([&] {
        batch_norm_forward_training<T>(input_view<T>(x), view_of<T>(y), values_of<T>(gamma),
                                       values_of<T>(beta),
                                       {mutable_values_of<T>(mean), mutable_values_of<T>(invstd)},
                                       running.stats<T>(), torch_options(momentum, eps));
      });
      running.finish();
    } else {
      TORCH_CHECK(running.mean.work.defined() && running.var.work.defined(),
                  "normkit.torch: running_mean and running_var must both be defined in "
                  "evaluation mode");
      // Copies: backward must see the statistics this forward used, even if the
      // buffers change before it runs.
      mean = running.mean.work.clone();
      invstd = at::empty({channels}, options);
      translating_errors([&] {
        batch_norm_forward_inference<T>(input_view<T>(x), view_of<T>(y), values_of<T>(gamma),
                                        values_of<T>(beta), values_of<T>(running.mean.work),
                                        values_of<T>(running.var.work), eps);
        batch_norm_invstd<T>(values_of<T>(running.var.work), eps, mutable_values_of<T>(invstd));
      });
    }
  });
  return {laid.result(y), mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight_arg,
    const Tensor& mean, const Tensor& invstd, bool training, double eps,
    std::array<bool, 3> output_mask) {
  (void)eps;  // the composite's (double backward); the kernels use invstd
  const Tensor weight = value_or_undefined(weight_arg);
  check_input("batch_norm_backward", input);
  check_like_x("grad_out", grad_out, input);
  check_parameter("batch_norm_backward", "weight", weight, input);
  const Laid laid(input);
  const Tensor x = laid(input), dy = laid(grad_out);
  const auto mode = training ? BackwardMode::training : BackwardMode::frozen;
  return backward_by_kernel(laid, x, weight, output_mask, [&](auto t, auto dxv, auto dgamma,
                                                                  auto dbeta, auto gamma) {
    using T = decltype(t);
    batch_norm_backward<T>(input_view<T>(x), input_view<T>(dy), dxv, gamma,
                           values_of<T>(channel_values(mean, laid.type)),
                           values_of<T>(channel_values(invstd, laid.type)), dgamma, dbeta, mode);
  });
}

Tensor batch_norm_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                      const OptionalTensor& running_mean, const OptionalTensor& running_var,
                      const OptionalTensor& num_batches_tracked, bool training,
                      c10::optional<double> momentum, double eps) {
  check_batch_norm_arguments("batch_norm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return batch_norm_forward(input, value_or_undefined(weight), value_or_undefined(bias), running,
                            training, momentum, eps)
      .y;
}

namespace {

// y = (x - mean)·invstd·γ + β, the statistics the batch's (training) or given.
Composite batch_norm_composite(const Tensor& mean, const Tensor& invstd, bool training,
                               double eps) {
  return [=](const Primals& p) {
    const Tensor x = p.x.to(compute_type(p.x));
    return affine(normalized_per_channel(x, mean, invstd, training, eps), p.weight, p.bias)
        .to(p.x.scalar_type());
  };
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(
    const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight),
      bias_shape_if(output_mask[2], {input.size(1)}),
      [&] {
        return as_list(batch_norm_backward_cpu(grad_out, input, weight, mean, invstd, training,
                                               eps, output_mask));
      },
      [&] { return batch_norm_composite(mean, invstd, training, eps); });
  return {outputs[0], outputs[1], outputs[2]};
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Running& running, bool training,
                        c10::optional<double> momentum, double eps) {
    auto r = batch_norm_forward(input, value_or_undefined(weight), value_or_undefined(bias),
                                running, training, momentum, eps);
    ctx->save_for_backward({input, value_or_undefined(weight), r.mean, r.invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] = input_slots({true, weight.has_value(), bias.has_value()});
    return r.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto wanted = wanted_gradients(ctx, 3);
    static const auto op =
        normkit_op<decltype(batch_norm_backward_cpu)>("normkit::batch_norm_backward");
    const auto [dx, dweight, dbias] =
        op.call(grads[0], saved[0], optional_of(saved[1]), saved[2], saved[3],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                {wanted[0], wanted[1], wanted[2]});
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm_autograd(const Tensor& input, const OptionalTensor& weight,
                           const OptionalTensor& bias, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var,
                           const OptionalTensor& num_batches_tracked, bool training,
                           c10::optional<double> momentum, double eps) {
  if (!records_graph(input, weight, bias))
    return batch_norm_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked,
                          training, momentum, eps);
  check_batch_norm_arguments("batch_norm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return BatchNormFunction::apply(input, weight, bias, running, training, momentum, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit, m) {
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
        "float? momentum, float eps) -> Tensor");
  m.def("batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor invstd, bool training, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace normkit::torch_ops
