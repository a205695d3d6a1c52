// Group and instance normalization as PyTorch ops (normkit/group_norm.hpp):
//   normkit::group_norm           y with per-(sample, group) statistics
//   normkit::instance_norm        y with per-(sample, channel) statistics (use_input_stats),
//                                 updating the running statistics given
//   normkit::group_norm_backward  (dx, dweight, dbias) of both (instance norm: groups = C)
// Instance norm with running statistics is normkit::batch_norm with training=False.
// Inputs of more than 5 dimensions ((N, C, *) for GroupNorm) run as (N, C, L).
#include <torch/library.h>

#include <tuple>

#include "ops.hpp"

namespace normkit::torch_ops {

namespace {

// x as the kernels take it: at most 5 dimensions.
Tensor kernel_shape(const Tensor& x) {
  if (x.dim() <= kMaxRank) return x;
  return x.contiguous().reshape({x.size(0), x.size(1), -1});
}

// y, and the N·G statistics (mean, invstd) backward needs. groups = nullopt: instance
// norm, whose running statistics move when given.
std::tuple<Tensor, Tensor, Tensor> group_stats_forward(const Tensor& input,
                                                       c10::optional<int64_t> groups,
                                                       const Tensor& weight, const Tensor& bias,
                                                       const Running* running,
                                                       c10::optional<double> momentum, double eps) {
  const Laid laid(input);
  const Tensor x = kernel_shape(laid(input));
  const int64_t n = x.size(0), g = groups.value_or(x.size(1));
  const auto options = x.options();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({n, g > 0 ? g : 0}, options), invstd = at::empty_like(mean);
  if (x.numel() == 0) return {laid.result(y.reshape(input.sizes())), mean.zero_(), invstd.zero_()};
  const Tensor gamma = channel_values(weight, laid.type), beta = channel_values(bias, laid.type);
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    const SavedStats<T> saved{mutable_values_of<T>(mean), mutable_values_of<T>(invstd)};
    translating_errors([&] {
      if (groups)
        group_norm_forward<T>(input_view<T>(x), view_of<T>(y), g, values_of<T>(gamma),
                              values_of<T>(beta), saved, eps);
      else
        instance_norm_forward_training<T>(input_view<T>(x), view_of<T>(y), values_of<T>(gamma),
                                          values_of<T>(beta), saved, running->stats<T>(),
                                          torch_options(momentum, eps));
    });
  });
  if (running) running->finish();
  return {laid.result(y.reshape(input.sizes())), mean, invstd};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_cpu(
    const Tensor& grad_out, const Tensor& input, int64_t groups, const OptionalTensor& weight_arg,
    const Tensor& mean, const Tensor& invstd, double eps, std::array<bool, 3> output_mask) {
  (void)eps;  // the composite's (double backward)
  const Tensor weight = value_or_undefined(weight_arg);
  check_input("group_norm_backward", input);
  check_like_x("grad_out", grad_out, input);
  check_parameter("group_norm_backward", "weight", weight, input);
  const Laid laid(input);
  const Tensor x = kernel_shape(laid(input)), dy = kernel_shape(laid(grad_out));
  auto [dx, dweight, dbias] = backward_by_kernel(
      laid, x, weight, output_mask, [&](auto t, auto dxv, auto dgamma, auto dbeta, auto gamma) {
        using T = decltype(t);
        group_norm_backward<T>(input_view<T>(x), input_view<T>(dy), dxv, groups, gamma,
                               values_of<T>(computed(mean, laid.type).contiguous()),
                               values_of<T>(computed(invstd, laid.type).contiguous()), dgamma,
                               dbeta);
      });
  return {dx.defined() ? dx.reshape(input.sizes()) : dx, dweight, dbias};
}

namespace {

Tensor group_norm_cpu(const Tensor& input, int64_t groups, const OptionalTensor& weight,
                      const OptionalTensor& bias, double eps) {
  check_batch_norm_arguments("group_norm", input, weight, bias, {}, {}, {});
  return std::get<0>(group_stats_forward(input, groups, value_or_undefined(weight),
                                         value_or_undefined(bias), nullptr, {}, eps));
}

Tensor instance_norm_cpu(const Tensor& input, const OptionalTensor& weight,
                         const OptionalTensor& bias, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, c10::optional<double> momentum,
                         double eps) {
  check_batch_norm_arguments("instance_norm", input, weight, bias, running_mean, running_var, {});
  const Running running(running_mean, running_var, {}, compute_type(input));
  return std::get<0>(group_stats_forward(input, c10::nullopt, value_or_undefined(weight),
                                         value_or_undefined(bias), &running, momentum, eps));
}

// y = (x - mean_g)·invstd_g·γ + β with the statistics of each (sample, group).
Composite group_norm_composite(int64_t groups, double eps) {
  return [=](const Primals& p) {
    const Tensor x = p.x.to(compute_type(p.x));
    const Tensor grouped = x.reshape({x.size(0), groups, -1});
    const Tensor centered = grouped - grouped.mean(-1, /*keepdim=*/true);
    const Tensor scale = (centered.pow(2).mean(-1, /*keepdim=*/true) + eps).rsqrt();
    return affine((centered * scale).reshape(x.sizes()), p.weight, p.bias).to(p.x.scalar_type());
  };
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_autograd(
    const Tensor& grad_out, const Tensor& input, int64_t groups, const OptionalTensor& weight,
    const Tensor& mean, const Tensor& invstd, double eps, std::array<bool, 3> output_mask) {
  const auto outputs = gradient_of(
      grad_out, input, Tensor(), value_or_undefined(weight),
      bias_shape_if(output_mask[2], {input.size(1)}),
      [&] {
        return as_list(group_norm_backward_cpu(grad_out, input, groups, weight, mean, invstd, eps,
                                               output_mask));
      },
      [&] { return group_norm_composite(groups, eps); });
  return {outputs[0], outputs[1], outputs[2]};
}

// The autograd node of group_norm (groups given) and instance_norm (groups = C).
struct GroupStatsFunction : public torch::autograd::Function<GroupStatsFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, c10::optional<int64_t> groups,
                        const Running* running, c10::optional<double> momentum, double eps) {
    auto [y, mean, invstd] =
        group_stats_forward(input, groups, value_or_undefined(weight), value_or_undefined(bias),
                            running, momentum, eps);
    ctx->save_for_backward({input, value_or_undefined(weight), mean, invstd});
    ctx->saved_data["groups"] = groups.value_or(input.size(1));
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["inputs"] = input_slots({true, weight.has_value(), bias.has_value()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto wanted = wanted_gradients(ctx, 3);
    static const auto op =
        normkit_op<decltype(group_norm_backward_cpu)>("normkit::group_norm_backward");
    const auto [dx, dweight, dbias] =
        op.call(grads[0], saved[0], ctx->saved_data["groups"].toInt(), optional_of(saved[1]),
                saved[2], saved[3], ctx->saved_data["eps"].toDouble(),
                {wanted[0], wanted[1], wanted[2]});
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor group_norm_autograd(const Tensor& input, int64_t groups, const OptionalTensor& weight,
                           const OptionalTensor& bias, double eps) {
  if (!records_graph(input, weight, bias))
    return group_norm_cpu(input, groups, weight, bias, eps);
  check_batch_norm_arguments("group_norm", input, weight, bias, {}, {}, {});
  return GroupStatsFunction::apply(input, weight, bias, c10::optional<int64_t>(groups), nullptr,
                                   c10::optional<double>(), eps);
}

Tensor instance_norm_autograd(const Tensor& input, const OptionalTensor& weight,
                              const OptionalTensor& bias, const OptionalTensor& running_mean,
                              const OptionalTensor& running_var, c10::optional<double> momentum,
                              double eps) {
  if (!records_graph(input, weight, bias))
    return instance_norm_cpu(input, weight, bias, running_mean, running_var, momentum, eps);
  check_batch_norm_arguments("instance_norm", input, weight, bias, running_mean, running_var, {});
  const Running running(running_mean, running_var, {}, compute_type(input));
  return GroupStatsFunction::apply(input, weight, bias, c10::optional<int64_t>(), &running,
                                   momentum, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit, m) {
  m.def("group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps) "
        "-> Tensor");
  m.def("instance_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float? momentum, float eps) -> Tensor");
  m.def("group_norm_backward(Tensor grad_out, Tensor input, int num_groups, Tensor? weight, "
        "Tensor mean, Tensor invstd, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("instance_norm", &instance_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("group_norm", &group_norm_autograd);
  m.impl("instance_norm", &instance_norm_autograd);
  m.impl("group_norm_backward", &group_norm_backward_autograd);
}

}  // namespace normkit::torch_ops
