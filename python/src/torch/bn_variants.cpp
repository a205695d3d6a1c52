// Batch Renormalization and Ghost BN as PyTorch ops (normkit/bn_variants.hpp), in
// training; their inference is normkit::batch_norm with training=False, as is
// frozen BN:
//   normkit::batch_renorm, normkit::batch_renorm_backward          (r and d constants)
//   normkit::ghost_batch_norm, normkit::ghost_batch_norm_backward
// batch_renorm takes the limits' schedule and reads the step from
// num_batches_tracked itself, so that no tensor becomes a Python number (tracing).
#include <torch/library.h>

#include <tuple>

#include "ops.hpp"

namespace normkit::torch_ops {

namespace {

struct RenormResult {
  Tensor y, mean, invstd, r, d;
};

RenormResult batch_renorm_forward(const Tensor& input, const Tensor& weight, const Tensor& bias,
                                  const Running& running, const BatchRenormSchedule& schedule,
                                  c10::optional<double> momentum, double eps) {
  TORCH_CHECK_VALUE(running.mean.work.defined() && running.var.work.defined() &&
                        running.num_batches_tracked.defined(),
                    "normkit.torch: batch renormalization needs running statistics and "
                    "num_batches_tracked");
  const RenormLimits limits =
      translating_errors([&] { return schedule.at(running.num_batches_tracked.item<int64_t>()); });
  const Laid laid(input);
  const Tensor x = laid(input);
  const int64_t channels = x.size(1);
  const auto options = x.options();
  Tensor y = at::empty_like(x);
  auto stat = [&] { return at::empty({channels}, options); };
  RenormResult result{Tensor(), stat(), stat(), stat(), stat()};
  const Tensor gamma = channel_values(weight, laid.type), beta = channel_values(bias, laid.type);
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    translating_errors([&] {
      batch_renorm_forward_training<T>(
          input_view<T>(x), view_of<T>(y), values_of<T>(gamma), values_of<T>(beta),
          {mutable_values_of<T>(result.mean), mutable_values_of<T>(result.invstd),
           mutable_values_of<T>(result.r), mutable_values_of<T>(result.d)},
          running.stats<T>(), limits, torch_options(momentum, eps));
    });
  });
  running.finish();
  result.y = laid.result(y);
  return result;
}

std::tuple<Tensor, Tensor, Tensor> ghost_forward(const Tensor& input, int64_t virtual_batch_size,
                                                 const Tensor& weight, const Tensor& bias,
                                                 const Running& running,
                                                 c10::optional<double> momentum, double eps) {
  const Laid laid(input);
  const Tensor x = laid(input);
  const int64_t ghosts =
      translating_errors([&] { return ghost_batch_count(x.size(0), virtual_batch_size); });
  const auto options = x.options();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({ghosts, x.size(1)}, options), invstd = at::empty_like(mean);
  const Tensor gamma = channel_values(weight, laid.type), beta = channel_values(bias, laid.type);
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    translating_errors([&] {
      ghost_batch_norm_forward_training<T>(
          input_view<T>(x), view_of<T>(y), values_of<T>(gamma), values_of<T>(beta),
          virtual_batch_size, {mutable_values_of<T>(mean), mutable_values_of<T>(invstd)},
          running.stats<T>(), torch_options(momentum, eps));
    });
  });
  running.finish();
  return {laid.result(y), mean, invstd};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_renorm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight_arg,
    const Tensor& mean, const Tensor& invstd, const Tensor& r, const Tensor& d, double eps,
    std::array<bool, 3> output_mask) {
  (void)eps;  // the composite's (double backward)
  const Tensor weight = value_or_undefined(weight_arg);
  check_input("batch_renorm_backward", input);
  check_like_x("grad_out", grad_out, input);
  check_parameter("batch_renorm_backward", "weight", weight, input);
  const Laid laid(input);
  const Tensor x = laid(input), dy = laid(grad_out);
  return backward_by_kernel(
      laid, x, weight, output_mask, [&](auto t, auto dxv, auto dgamma, auto dbeta, auto gamma) {
        using T = decltype(t);
        auto values = [&](const Tensor& v) { return values_of<T>(channel_values(v, laid.type)); };
        batch_renorm_backward<T>(input_view<T>(x), input_view<T>(dy), dxv, gamma, values(mean),
                                 values(invstd), values(r), values(d), dgamma, dbeta);
      });
}

std::tuple<Tensor, Tensor, Tensor> ghost_batch_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, int64_t virtual_batch_size,
    const OptionalTensor& weight_arg, const Tensor& mean, const Tensor& invstd, double eps,
    std::array<bool, 3> output_mask) {
  (void)eps;  // the composite's (double backward)
  const Tensor weight = value_or_undefined(weight_arg);
  check_input("ghost_batch_norm_backward", input);
  check_like_x("grad_out", grad_out, input);
  check_parameter("ghost_batch_norm_backward", "weight", weight, input);
  const Laid laid(input);
  const Tensor x = laid(input), dy = laid(grad_out);
  return backward_by_kernel(
      laid, x, weight, output_mask, [&](auto t, auto dxv, auto dgamma, auto dbeta, auto gamma) {
        using T = decltype(t);
        auto values = [&](const Tensor& v) {
          return values_of<T>(computed(v, laid.type).contiguous());
        };
        ghost_batch_norm_backward<T>(input_view<T>(x), input_view<T>(dy), dxv, gamma,
                                     virtual_batch_size, values(mean), values(invstd), dgamma,
                                     dbeta);
      });
}

namespace {

BatchRenormSchedule schedule_of(double rmax, double dmax, int64_t hold_steps,
                                int64_t rmax_ramp_steps, int64_t dmax_ramp_steps) {
  return {rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps};
}

Tensor batch_renorm_cpu(const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Tensor& running_mean,
                        const Tensor& running_var, const Tensor& num_batches_tracked, double rmax,
                        double dmax, int64_t hold_steps, int64_t rmax_ramp_steps,
                        int64_t dmax_ramp_steps, c10::optional<double> momentum, double eps) {
  check_batch_norm_arguments("batch_renorm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return batch_renorm_forward(input, value_or_undefined(weight), value_or_undefined(bias), running,
                              schedule_of(rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps),
                              momentum, eps)
      .y;
}

Tensor ghost_batch_norm_cpu(const Tensor& input, int64_t virtual_batch_size,
                            const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            const OptionalTensor& num_batches_tracked,
                            c10::optional<double> momentum, double eps) {
  check_batch_norm_arguments("ghost_batch_norm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return std::get<0>(ghost_forward(input, virtual_batch_size, value_or_undefined(weight),
                                   value_or_undefined(bias), running, momentum, eps));
}

// y = γ·((x - μ_B)·invstd_B·r + d) + β, the batch's statistics differentiable, r and d
// constants.
Composite renorm_composite(const Tensor& r, const Tensor& d, double eps) {
  return [=](const Primals& p) {
    const Tensor x = p.x.to(compute_type(p.x));
    const Tensor y = normalized_per_channel(x, Tensor(), Tensor(), true, eps) * per_channel(r, x) +
                     per_channel(d, x);
    return affine(y, p.weight, p.bias).to(p.x.scalar_type());
  };
}

// Batch norm on each virtual batch (x.split(virtual_batch_size)) with its own statistics.
Composite ghost_composite(int64_t virtual_batch_size, double eps) {
  return [=](const Primals& p) {
    const Tensor x = p.x.to(compute_type(p.x));
    std::vector<Tensor> pieces;
    for (const Tensor& piece : x.split(virtual_batch_size))
      pieces.push_back(normalized_per_channel(piece, Tensor(), Tensor(), true, eps));
    return affine(at::cat(pieces), p.weight, p.bias).to(p.x.scalar_type());
  };
}

std::tuple<Tensor, Tensor, Tensor> batch_renorm_backward_autograd(
    const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
    const Tensor& invstd, const Tensor& r, const Tensor& d, double eps,
    std::array<bool, 3> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight),
      bias_shape_if(output_mask[2], {input.size(1)}),
      [&] {
        return as_list(batch_renorm_backward_cpu(grad_out, input, weight, mean, invstd, r, d, eps,
                                                 output_mask));
      },
      [&] { return renorm_composite(r, d, eps); });
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<Tensor, Tensor, Tensor> ghost_batch_norm_backward_autograd(
    const Tensor& grad_out, const Tensor& input, int64_t virtual_batch_size,
    const OptionalTensor& weight, const Tensor& mean, const Tensor& invstd, double eps,
    std::array<bool, 3> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight),
      bias_shape_if(output_mask[2], {input.size(1)}),
      [&] {
        return as_list(ghost_batch_norm_backward_cpu(grad_out, input, virtual_batch_size, weight,
                                                     mean, invstd, eps, output_mask));
      },
      [&] { return ghost_composite(virtual_batch_size, eps); });
  return {outputs[0], outputs[1], outputs[2]};
}

struct BatchRenormFunction : public torch::autograd::Function<BatchRenormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Running& running,
                        const BatchRenormSchedule& schedule, c10::optional<double> momentum,
                        double eps) {
    auto res = batch_renorm_forward(input, value_or_undefined(weight), value_or_undefined(bias),
                                    running, schedule, momentum, eps);
    ctx->save_for_backward({input, value_or_undefined(weight), res.mean, res.invstd, res.r, res.d});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] = input_slots({true, weight.has_value(), bias.has_value()});
    return res.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto wanted = wanted_gradients(ctx, 3);
    static const auto op =
        normkit_op<decltype(batch_renorm_backward_cpu)>("normkit::batch_renorm_backward");
    const auto [dx, dweight, dbias] =
        op.call(grads[0], s[0], optional_of(s[1]), s[2], s[3], s[4], s[5],
                ctx->saved_data["eps"].toDouble(), {wanted[0], wanted[1], wanted[2]});
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct GhostBatchNormFunction : public torch::autograd::Function<GhostBatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Running& running,
                        int64_t virtual_batch_size, c10::optional<double> momentum, double eps) {
    auto [y, mean, invstd] = ghost_forward(input, virtual_batch_size, value_or_undefined(weight),
                                           value_or_undefined(bias), running, momentum, eps);
    ctx->save_for_backward({input, value_or_undefined(weight), mean, invstd});
    ctx->saved_data["virtual_batch_size"] = virtual_batch_size;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] = input_slots({true, weight.has_value(), bias.has_value()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto wanted = wanted_gradients(ctx, 3);
    static const auto op =
        normkit_op<decltype(ghost_batch_norm_backward_cpu)>("normkit::ghost_batch_norm_backward");
    const auto [dx, dweight, dbias] =
        op.call(grads[0], s[0], ctx->saved_data["virtual_batch_size"].toInt(), optional_of(s[1]),
                s[2], s[3], ctx->saved_data["eps"].toDouble(), {wanted[0], wanted[1], wanted[2]});
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_renorm_autograd(const Tensor& input, const OptionalTensor& weight,
                             const OptionalTensor& bias, const Tensor& running_mean,
                             const Tensor& running_var, const Tensor& num_batches_tracked,
                             double rmax, double dmax, int64_t hold_steps,
                             int64_t rmax_ramp_steps, int64_t dmax_ramp_steps,
                             c10::optional<double> momentum, double eps) {
  if (!records_graph(input, weight, bias))
    return batch_renorm_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked,
                            rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps, momentum,
                            eps);
  check_batch_norm_arguments("batch_renorm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return BatchRenormFunction::apply(
      input, weight, bias, running,
      schedule_of(rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps), momentum, eps);
}

Tensor ghost_batch_norm_autograd(const Tensor& input, int64_t virtual_batch_size,
                                 const OptionalTensor& weight, const OptionalTensor& bias,
                                 const OptionalTensor& running_mean,
                                 const OptionalTensor& running_var,
                                 const OptionalTensor& num_batches_tracked,
                                 c10::optional<double> momentum, double eps) {
  if (!records_graph(input, weight, bias))
    return ghost_batch_norm_cpu(input, virtual_batch_size, weight, bias, running_mean,
                                running_var, num_batches_tracked, momentum, eps);
  check_batch_norm_arguments("ghost_batch_norm", input, weight, bias, running_mean, running_var,
                             num_batches_tracked);
  const Running running(running_mean, running_var, num_batches_tracked, compute_type(input));
  return GhostBatchNormFunction::apply(input, weight, bias, running, virtual_batch_size, momentum,
                                       eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit, m) {
  m.def("batch_renorm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, Tensor(c!) num_batches_tracked, float rmax, float dmax, "
        "int hold_steps, int rmax_ramp_steps, int dmax_ramp_steps, float? momentum, float eps) "
        "-> Tensor");
  m.def("batch_renorm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor invstd, Tensor r, Tensor d, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ghost_batch_norm(Tensor input, int virtual_batch_size, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "float? momentum, float eps) -> Tensor");
  m.def("ghost_batch_norm_backward(Tensor grad_out, Tensor input, int virtual_batch_size, "
        "Tensor? weight, Tensor mean, Tensor invstd, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("batch_renorm", &batch_renorm_cpu);
  m.impl("batch_renorm_backward", &batch_renorm_backward_cpu);
  m.impl("ghost_batch_norm", &ghost_batch_norm_cpu);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("batch_renorm", &batch_renorm_autograd);
  m.impl("batch_renorm_backward", &batch_renorm_backward_autograd);
  m.impl("ghost_batch_norm", &ghost_batch_norm_autograd);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward_autograd);
}

}  // namespace normkit::torch_ops
