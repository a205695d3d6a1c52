// The shared pieces of the op families (ops.hpp).
#include "ops.hpp"

namespace normkit::torch_ops {

void check_batch_norm_arguments(const char* op, const Tensor& input, const OptionalTensor& weight,
                                const OptionalTensor& bias, const OptionalTensor& running_mean,
                                const OptionalTensor& running_var,
                                const OptionalTensor& num_batches_tracked) {
  check_input(op, input);
  check_parameter(op, "weight", value_or_undefined(weight), input);
  check_parameter(op, "bias", value_or_undefined(bias), input);
  check_parameter(op, "running_mean", value_or_undefined(running_mean), input);
  check_parameter(op, "running_var", value_or_undefined(running_var), input);
  check_counter(value_or_undefined(num_batches_tracked));
}

Tensor parameter_result(const Tensor& gradient, const Tensor& parameter) {
  if (!gradient.defined() || !parameter.defined() ||
      gradient.scalar_type() == parameter.scalar_type())
    return gradient;
  return gradient.to(parameter.scalar_type());
}

Tensor affine(const Tensor& y, const Tensor& weight, const Tensor& bias) {
  Tensor result = y;
  if (weight.defined()) result = result * per_channel(weight, y);
  if (bias.defined()) result = result + per_channel(bias, y);
  return result;
}

Tensor normalized_per_channel(const Tensor& x, const Tensor& mean, const Tensor& invstd,
                              bool training, double eps) {
  if (!training) return (x - per_channel(mean, x)) * per_channel(invstd, x);
  const auto dims = all_but_channels(x);
  const Tensor centered = x - x.mean(dims, /*keepdim=*/true);
  return centered * (centered.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
}

int64_t input_slots(std::initializer_list<bool> present) {
  int64_t bits = 0, bit = 1;
  for (const bool p : present) {
    if (p) bits |= bit;
    bit <<= 1;
  }
  return bits;
}

std::vector<bool> wanted_gradients(AutogradContext* ctx, int n) {
  const int64_t bits = ctx->saved_data["inputs"].toInt();
  std::vector<bool> wanted(static_cast<size_t>(n), false);
  size_t edge = 0;
  for (int i = 0; i < n; ++i)
    if (bits & (int64_t{1} << i)) wanted[static_cast<size_t>(i)] = ctx->needs_input_grad(edge++);
  return wanted;
}

}  // namespace normkit::torch_ops
