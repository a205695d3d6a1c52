#pragma once
// Gradients of the ops, and gradients of the gradients.
//
// Each family registers two ops: the forward (normkit::batch_norm, ...) and its
// backward (normkit::batch_norm_backward, ...), both computed by normkit's kernels.
// The forward's autograd kernel is a torch::autograd::Function whose backward calls
// the backward op through the dispatcher, so vmap (batched gradients) and autograd
// see an op. The backward op's own autograd kernel, GradientFunction, makes the
// first-order gradient differentiable (double backward: gradient penalties, MAML,
// Hessian-vector products). Its backward differentiates the family's forward
// written in ATen ops (the "composite": the formula in the family's header) twice
// with autograd, so second and higher derivatives need no formulas of their own
// and agree with the first-order kernels by construction; they run at ATen's speed.
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <optional>
#include <vector>

#include "tensors.hpp"

namespace normkit::torch_ops {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The differentiable inputs of a forward: x, a residual (fused BN+Add+ReLU),
// weight and bias, undefined when absent.
struct Primals {
  Tensor x, residual, weight, bias;
};

// y = composite(primals): the forward in differentiable ATen ops, with the
// statistics, masks and constants of the call captured.
using Composite = std::function<Tensor(const Primals&)>;

// The backward op's outputs, (dx, [dresidual,] dweight, dbias), from normkit's kernels;
// undefined where not wanted (or absent).
using FirstOrder = std::function<variable_list()>;

// The autograd kernel of every backward op.
struct GradientFunction : public torch::autograd::Function<GradientFunction> {
  // The outputs of first_order(), differentiable with respect to dy, x, the residual
  // and the weight. bias_shape: the bias's shape when its gradient is among the
  // outputs (a zero stand-in takes its place in the composite: the gradient of the
  // gradient does not depend on its value).
  static variable_list forward(AutogradContext* ctx, const Tensor& dy, const Tensor& x,
                               const c10::optional<Tensor>& residual,
                               const c10::optional<Tensor>& weight,
                               std::optional<std::vector<int64_t>> bias_shape,
                               const FirstOrder& first_order, const Composite& composite);
  static variable_list backward(AutogradContext* ctx, variable_list defined_ggs);
};

// An optional tensor for GradientFunction::apply (absent when undefined).
inline c10::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

// Whether autograd records a graph of a call on these tensors (grad mode on and
// one of them requires grad). Without one, the autograd kernels run the CPU
// kernel directly, which spares the common first-order backward and no_grad
// forwards the bookkeeping of a Function.
inline bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptionalTensor& t) { return t && requires_grad(*t); }
template <class... Tensors>
bool records_graph(const Tensors&... tensors) {
  return torch::autograd::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// The autograd kernel of a backward op: first_order() when no graph is recorded,
// else GradientFunction over it, with the composite make_composite() gives (autograd
// Functions return only defined tensors; the absent outputs are put back in place).
template <class First, class MakeComposite>
variable_list gradient_of(const Tensor& dy, const Tensor& x, const Tensor& residual,
                          const Tensor& weight, std::optional<std::vector<int64_t>> bias_shape,
                          First&& first_order, MakeComposite&& make_composite) {
  if (!records_graph(dy, x, residual, weight)) return first_order();
  variable_list all;
  const auto outputs =
      GradientFunction::apply(dy, x, optional_of(residual), optional_of(weight),
                              std::move(bias_shape),
                              FirstOrder([&] {
                                all = first_order();
                                return all;
                              }),
                              make_composite());
  for (size_t i = 0, k = 0; i < all.size(); ++i)
    if (all[i].defined()) all[i] = outputs[k++];
  return all;
}

}  // namespace normkit::torch_ops
