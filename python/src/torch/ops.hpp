#pragma once
// What the op families of the PyTorch extension share beyond the tensor adapter:
// batch norm's forward (the fused, variant and instance-norm ops reuse it), the
// argument checks of the batch-norm family, the shape of every backward kernel
// call, and the pieces of the composites (autograd.hpp).
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd.hpp"
#include "tensors.hpp"

namespace normkit::torch_ops {

// y, and the statistics backward needs: the batch's (training) or the running mean
// and 1 / sqrt(running_var + eps). Statistics in the compute type.
struct BatchNormResult {
  Tensor y, mean, invstd;
};
BatchNormResult batch_norm_forward(const Tensor& input, const Tensor& weight, const Tensor& bias,
                                   const Running& running, bool training,
                                   c10::optional<double> momentum, double eps);

// The checks of every batch-norm-family forward: x, the per-channel tensors and the
// counter.
void check_batch_norm_arguments(const char* op, const Tensor& input, const OptionalTensor& weight,
                                const OptionalTensor& bias, const OptionalTensor& running_mean,
                                const OptionalTensor& running_var,
                                const OptionalTensor& num_batches_tracked);

// A parameter's gradient in the parameter's dtype (the compute type without one).
Tensor parameter_result(const Tensor& gradient, const Tensor& parameter);

// A backward whose kernel computes (dx, dγ, dβ) per channel: allocates what
// output_mask asks for (dx like x, dγ and dβ with C values), runs
// kernel(T{}, dx view, dγ span, dβ span, γ span) for the compute type T, and returns
// them in the caller's dtypes (dx: x's, dγ and dβ: weight's). An empty x gives zeros.
template <class Kernel>
std::tuple<Tensor, Tensor, Tensor> backward_by_kernel(const Laid& laid, const Tensor& x,
                                                      const Tensor& weight,
                                                      std::array<bool, 3> output_mask,
                                                      Kernel&& kernel) {
  const int64_t channels = x.size(1);
  const auto options = x.options();
  if (x.numel() == 0) {
    auto zeros = [&](bool wanted) { return wanted ? at::zeros({channels}, options) : Tensor(); };
    return {output_mask[0] ? laid.result(at::zeros_like(x)) : Tensor(),
            parameter_result(zeros(output_mask[1]), weight),
            parameter_result(zeros(output_mask[2]), weight)};
  }
  Tensor dx = output_mask[0] ? at::empty_like(x) : Tensor();
  Tensor dgamma = output_mask[1] ? at::empty({channels}, options) : Tensor();
  Tensor dbeta = output_mask[2] ? at::empty({channels}, options) : Tensor();
  const Tensor gamma = channel_values(weight, laid.type);
  by_dtype(laid.type, [&](auto t) {
    using T = decltype(t);
    translating_errors([&] {
      kernel(t, dx.defined() ? view_of<T>(dx) : TensorView<T>{}, mutable_values_of<T>(dgamma),
             mutable_values_of<T>(dbeta), values_of<T>(gamma));
    });
  });
  return {dx.defined() ? laid.result(dx) : dx, parameter_result(dgamma, weight),
          parameter_result(dbeta, weight)};
}

// y·γ + β with per-channel γ and β, either absent.
Tensor affine(const Tensor& y, const Tensor& weight, const Tensor& bias);

// Batch norm's x̂ = (x - mean)·invstd in ATen ops (a composite's core): the batch's
// statistics, differentiable, in training; the given ones (constants) otherwise.
Tensor normalized_per_channel(const Tensor& x, const Tensor& mean, const Tensor& invstd,
                              bool training, double eps);

inline std::optional<std::vector<int64_t>> bias_shape_if(bool wanted, std::vector<int64_t> shape) {
  if (!wanted) return std::nullopt;
  return shape;
}

template <class... T>
variable_list as_list(const std::tuple<T...>& values) {
  return std::apply([](const auto&... v) { return variable_list{v...}; }, values);
}

// The op `name` of the normkit library as a typed handle, to call through the
// dispatcher (autograd and vmap see the call).
template <class Signature>
c10::TypedOperatorHandle<Signature> normkit_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Which of a forward's tensor arguments were given (bit i: argument i), saved so
// that backward can map them to autograd's input edges, which skip absent ones.
int64_t input_slots(std::initializer_list<bool> present);
// For each of the first n tensor arguments: given and its gradient needed.
std::vector<bool> wanted_gradients(AutogradContext* ctx, int n);

}  // namespace normkit::torch_ops
