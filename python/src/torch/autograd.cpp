// GradientFunction: the autograd kernel of every backward op (autograd.hpp).
#include "autograd.hpp"

#include <torch/csrc/autograd/autograd.h>

namespace normkit::torch_ops {

namespace {

// What backward needs besides the saved tensors: the composite (with the
// statistics and masks it captured) and which outputs exist.
struct Closures : torch::CustomClassHolder {
  Composite composite;
  bool has_residual = false;
  std::optional<std::vector<int64_t>> bias_shape;
  std::vector<bool> defined;  // which of first_order()'s outputs exist (Functions return only those)
};

// t as an input of the local graph. The gradients asked of it must be partial
// derivatives: dy may itself depend on x, and the engine chains through dy's history
// on its own. When the caller builds a graph of the result (create_graph) and t has
// one, an alias of t (view_as): gradients stop at the alias, and higher derivatives
// still reach t's history through it. Else a fresh leaf.
Tensor input_of(const Tensor& t, bool create_graph) {
  if (!t.defined()) return t;
  if (create_graph && t.requires_grad()) return t.view_as(t);
  return t.detach().requires_grad_(true);
}

}  // namespace

variable_list GradientFunction::forward(AutogradContext* ctx, const Tensor& dy, const Tensor& x,
                                        const c10::optional<Tensor>& residual,
                                        const c10::optional<Tensor>& weight,
                                        std::optional<std::vector<int64_t>> bias_shape,
                                        const FirstOrder& first_order, const Composite& composite) {
  auto closures = c10::make_intrusive<Closures>();
  closures->composite = composite;
  closures->has_residual = residual.has_value();
  closures->bias_shape = std::move(bias_shape);
  variable_list outputs;
  for (const Tensor& t : first_order()) {
    closures->defined.push_back(t.defined());
    if (t.defined()) outputs.push_back(t);
  }
  ctx->saved_data["closures"] = at::IValue::make_capsule(std::move(closures));
  ctx->save_for_backward({dy, x, value_or_undefined(residual), value_or_undefined(weight)});
  // A gradient of the gradient that does not reach an output counts as zero.
  ctx->set_materialize_grads(false);
  return outputs;
}

variable_list GradientFunction::backward(AutogradContext* ctx, variable_list defined_ggs) {
  const auto closures =
      c10::static_intrusive_pointer_cast<Closures>(ctx->saved_data["closures"].toCapsule());
  // Back to the backward op's output positions.
  variable_list ggs;
  for (size_t i = 0, k = 0; i < closures->defined.size(); ++i)
    ggs.push_back(closures->defined[i] ? defined_ggs[k++] : Tensor());
  const auto saved = ctx->get_saved_variables();
  const bool create_graph = torch::autograd::GradMode::is_enabled();
  const Tensor dy = input_of(saved[0], create_graph);
  Primals p{input_of(saved[1], create_graph), input_of(saved[2], create_graph),
            input_of(saved[3], create_graph), Tensor()};
  if (closures->bias_shape)
    p.bias = at::zeros(*closures->bias_shape, saved[1].options().dtype(compute_type(saved[1])))
                 .requires_grad_(true);

  // The outputs of the backward op, in order, paired with the primals they are the
  // gradients of.
  std::vector<Tensor> primal_of_output{p.x};
  if (closures->has_residual) primal_of_output.push_back(p.residual);
  primal_of_output.push_back(p.weight);
  primal_of_output.push_back(p.bias);

  variable_list inputs{dy, p.x}, results(4);
  if (p.residual.defined()) inputs.push_back(p.residual);
  if (p.weight.defined()) inputs.push_back(p.weight);

  torch::autograd::AutoGradMode enable(true);
  const Tensor y = closures->composite(p);
  variable_list wrt, ggs_used;
  for (size_t i = 0; i < ggs.size() && i < primal_of_output.size(); ++i)
    if (ggs[i].defined() && primal_of_output[i].defined()) {
      wrt.push_back(primal_of_output[i]);
      ggs_used.push_back(ggs[i]);
    }
  if (!wrt.empty()) {
    // First order, as a graph: the vector-Jacobian product of the composite with dy.
    const variable_list first = torch::autograd::grad({y}, wrt, {dy}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    variable_list outputs, grad_outputs;
    for (size_t i = 0; i < first.size(); ++i)
      if (first[i].defined() && first[i].requires_grad()) {
        outputs.push_back(first[i]);
        grad_outputs.push_back(ggs_used[i]);
      }
    if (!outputs.empty()) {
      const variable_list second = torch::autograd::grad(
          outputs, inputs, grad_outputs, /*retain_graph=*/create_graph, create_graph,
          /*allow_unused=*/true);
      // Back to the forward's argument order: dy, x, residual, weight.
      size_t k = 0;
      results[0] = second[k++];
      results[1] = second[k++];
      if (p.residual.defined()) results[2] = second[k++];
      if (p.weight.defined()) results[3] = second[k++];
    }
  }
  // dy, x, residual, weight, then the non-tensor arguments.
  results.resize(7);
  return results;
}

}  // namespace normkit::torch_ops
