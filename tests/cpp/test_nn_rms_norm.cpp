// The engine's rmsnorm layer: y = x / sqrt(mean(x²) + eps) · γ over each sample's
// features, against a double formula in both memory formats; its gradients
// against finite differences; no β, no buffers; a model with it trains.
#include <gtest/gtest.h>

#include <cmath>

#include "nn_test_support.hpp"
#include "normkit/engine/train.hpp"

namespace {

using namespace nn_test;
using normkit::nn::Model;
using normkit::nn::ModelSpec;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

TEST(NnRmsNorm, MatchesTheFormulaOverEachSampleInBothFormats) {
  for (const auto& shape : {std::vector<int64_t>{6, 5}, std::vector<int64_t>{3, 4, 3, 5}})
    for (const auto format : kFormats) {
      if (shape.size() == 2 && format == MemoryFormat::channels_last) continue;
      SCOPED_TRACE(std::to_string(shape.size()) + " dims, " + name_of(format));
      const int64_t N = shape[0], F = product(shape) / N;
      auto layer = make_layer("rmsnorm eps=0.001", {shape.begin() + 1, shape.end()}, format);
      ASSERT_EQ(layer->parameters().size(), 1u) << "γ only";
      EXPECT_TRUE(layer->buffers().empty());
      auto& gamma = layer->parameters()[0]->value;
      gamma = normal_values(F, 81, 0.5f, 1.0f);
      const auto xs = normal_values(product(shape), 83, 2.0f, 3.0f);
      const Tensor& y = layer->forward(make_tensor(shape, format, xs), Mode::train);
      const auto ys = canonical(y);
      for (int64_t n = 0; n < N; ++n) {
        double sq = 0;
        for (int64_t f = 0; f < F; ++f) sq += static_cast<double>(xs[n * F + f]) * xs[n * F + f];
        const double inv_rms = 1.0 / std::sqrt(sq / static_cast<double>(F) + 1e-3);
        for (int64_t f = 0; f < F; ++f) {
          const double expected = xs[n * F + f] * inv_rms * gamma[f];
          ASSERT_NEAR(ys[n * F + f], expected, 1e-5 * (1 + std::abs(expected))) << n << ", " << f;
        }
      }
      check_layer_gradients(*layer, make_tensor(shape, format, xs), {}, "gradients");
    }
}

TEST(NnRmsNorm, InAModelItTrains) {
  Model model(ModelSpec::parse("input 2 4 4; conv 4 3 pad=1 bias=0; rmsnorm; relu; flatten; linear 4"),
              MemoryFormat::channels_last);
  model.initialize({}, 1);
  const auto set = blobs(64, 2);
  auto optimizer = normkit::nn::make_sgd({.lr = 0.05f, .momentum = 0.9f}, model.parameters());
  const double before = normkit::train::evaluate(model, set).loss;
  for (int epoch = 0; epoch < 5; ++epoch) normkit::train::train_epoch(model, *optimizer, set, 16, 1, epoch);
  EXPECT_LT(normkit::train::evaluate(model, set).loss, 0.5 * before);
  EXPECT_NE(model.summary().find("rmsnorm"), std::string::npos);
}

}  // namespace
