#pragma once
// Shared by the spec and checkpoint targets: a model an accepted input builds is
// checked against its spec's sizes (ModelSpec::size, which checkpoints rely on)
// and, when small, trained one step on a batch of two, so the fuzzer's odd
// geometries (strides, padding, 1-pixel images) run through every layer.
#include <cmath>

#include "fuzz_support.hpp"
#include "normkit/engine/nn.hpp"

namespace normkit::fuzz {

// Bytes a fuzzed model may take for a step on two samples: small models only.
constexpr double kModelBudget = 16e6;
// And work: parameters x activations per sample bounds a step's multiply-adds
// (a convolution's are its weights x its output positions). Within the byte budget
// a wide convolution on a large image still took over 10 s under ASan: a timeout
// of the fuzzer, not a finding.
constexpr double kModelWork = 5e8;

inline void exercise_model(nn::Model& model) {
  const nn::ModelSize size = model.spec().size();
  int64_t parameters = 0, state = 0;
  for (auto* p : model.parameters()) parameters += static_cast<int64_t>(p->value.size());
  for (const auto& entry : model.state()) state += static_cast<int64_t>(entry.second->size());
  expect(size.parameters == parameters && size.buffers == state - parameters,
         "ModelSpec::size agrees with the built model", model.spec().to_string());
  if (size.training_bytes(2) > kModelBudget ||
      static_cast<double>(size.parameters) * static_cast<double>(size.activations) > kModelWork)
    return;

  nn::Tensor x;
  std::vector<int64_t> shape = {2};
  shape.insert(shape.end(), model.spec().input_shape.begin(), model.spec().input_shape.end());
  x.reshape(shape, model.format());
  for (size_t i = 0; i < x.data.size(); ++i) x.data[i] = static_cast<float>(i % 7) - 3.0f;
  const int32_t labels[2] = {0, 1};
  try {
    model.initialize({}, 1);
    const nn::Tensor& logits = model.forward(x, nn::Mode::train);
    nn::Tensor dlogits;
    nn::softmax_cross_entropy(logits, labels, &dlogits);
    model.zero_grad();
    model.backward(dlogits);
    model.forward(x, nn::Mode::eval);
  } catch (const Error&) {
    // A layer may refuse a batch (non-finite statistics, one value per channel).
  }
}

}  // namespace normkit::fuzz
